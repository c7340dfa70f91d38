"""The inversion step: optimise a batch of images so the frozen VLM gives the target answer.

`Inversion` owns the image parameter (`parameterisations.py`: the pixels, a 1/f-scaled spectrum or
a smaller image, each behind the box), its optimiser, the augmentation RNG and the step counter;
its `state_dict` is everything a bit-identical resume needs. It knows nothing of files or UIs.
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

import torch

from . import parameterisations, transforms
from .adapter import Prompt, VLMAdapter
from .config import InversionConfig
from .engine import vision_sites
from .features import FeatureRecorder
from .guides import load_guide
from .lm import LMRecorder
from .terms import StepContext


ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's per-parameter state besides its step


@dataclass
class ActiveTerm:
    name: str
    fn: Callable[[StepContext], torch.Tensor]
    scale: float
    reads: tuple[str, ...] = ()  # ObjectiveSpec.reads

    @classmethod
    def of(cls, spec, scale: float) -> "ActiveTerm":
        return cls(spec.name, spec.term, scale, spec.reads)


def build_inversion(registry, adapter: VLMAdapter, prompt: Prompt, config: InversionConfig, stats=None, *,
                    rank: int = 0, lm_objective=None) -> "Inversion":
    """The one way to build an `Inversion` from settings: the config's objective terms at their
    scales, as the registry's plugins define them (a term at scale 0 is never computed), and the
    config's guide network, which the Inversion loads only when a term on reads it."""
    specs = registry.objective_specs()
    terms = [ActiveTerm.of(specs[name], scale) for name, scale in config.scales.items()]
    return Inversion(adapter, prompt, config, terms, stats, rank=rank, lm_objective=lm_objective,
                     guide=lambda: load_guide(registry, config.guide, config.guide_weights, adapter.device))


class Inversion:
    def __init__(self, adapter: VLMAdapter, prompt: Prompt, config: InversionConfig,
                 terms: list[ActiveTerm], stats=None, rank: int = 0, lm_objective=None, guide=None):
        self.adapter, self.prompt, self.config = adapter, prompt, config
        self.terms = [t for t in terms if t.scale != 0]  # a term at scale 0 is never computed
        # Hooks and recomputation are set up once for the whole run (a compiled step must not see
        # them change) and undone by `close`: the adapter is shared by the runs of a sweep.
        self._undo = ExitStack()
        reads = {what for t in self.terms for what in t.reads}  # what the active terms need prepared
        # `guide`: () -> guides.Guide, called only when a term reads it (its weights may be large);
        # first, so that a bad weights file fails before any hook is put on the shared model
        self.guide = self._undo.enter_context(guide()) if guide and "guide" in reads else None
        uses_features = "vision_statistics" in reads
        self.recorder = self._undo.enter_context(
            FeatureRecorder(adapter, config.batch_size * config.views, vision_sites(adapter, config.feature_sites))) \
            if uses_features else None
        # an objective term reads the hidden state at its objective's site
        self.lm_objective = lm_objective if "lm_objective" in reads else None
        self.lm_recorder = self._undo.enter_context(LMRecorder(adapter, [lm_objective.site])) if self.lm_objective else None
        self.normalisation = adapter.normalisation()
        self._undo.enter_context(adapter.activation_checkpointing(config.memory_saving))
        self.objective = torch.compile(self._objective, dynamic=False) if config.compile else self._objective
        self.stats = stats.targets(adapter.device) if stats is not None else None
        self.targets = prompt.target_ids.to(adapter.device)
        self.low, self.high = adapter.pixel_box()
        # One CPU generator drives init and every augmentation: the same on any device, and
        # offset by rank so that every process of a multi-GPU run makes different images.
        self.generator = torch.Generator().manual_seed(config.seed + rank)
        self.transforms = transforms.from_settings(config.transforms, config.jitter, config.flip)
        self.parameterisation = parameterisations.parse(config.parameterisation)
        side = config.resolution
        start = self.parameterisation.start((config.batch_size, 3, side, side), config.init, self.generator,
                                            (self.low, self.high))
        self.latent = start.requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.latent], lr=config.lr, betas=(0.5, 0.9), eps=1e-8)
        self.step = 0

    @property
    def images(self) -> torch.Tensor:
        """The current images, normalised [B, 3, H, W] (for pixel: the optimised tensor itself)."""
        return self.parameterisation.images(self.latent, (self.low, self.high), self.config.resolution)

    def lr_at(self, step: int) -> float:
        """Cosine decay from lr to min_lr over the run, no warm-up."""
        c = self.config
        return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + math.cos(math.pi * step / c.iterations))

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """The model's input this step: `views` augmented copies of the batch ([views * B, ...])."""
        return transforms.augment(images, self.transforms, self.config.views, self.generator, (self.low, self.high))

    def _objective(self, pixels: torch.Tensor):
        """Model forward and every active term: (weighted loss, unweighted terms, target logits)."""
        logits = self.adapter.target_logits(pixels, self.prompt)
        ctx = StepContext(pixels=pixels, logits=logits, targets=self.targets,
                          features=self.recorder.stats if self.recorder else {}, stats=self.stats,
                          patch_size=self.adapter.patch_size, feature_form=self.config.feature_form,
                          hidden=self.lm_recorder.hidden if self.lm_recorder else {}, lm_objective=self.lm_objective,
                          normalisation=self.normalisation, guide=self.guide)
        values = {t.name: t.fn(ctx) for t in self.terms}
        return sum(t.scale * values[t.name] for t in self.terms), values, logits

    def run_step(self, want_metrics: bool = False) -> dict | None:
        """One optimisation step. Metrics (which need host syncs) only when asked for."""
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, values, logits = self.objective(self.augment(self.images))
        self._last = loss, values  # read back only when asked (`nonfinite_terms`)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        metrics = self._metrics(loss, values, logits, lr) if want_metrics else None
        self.optimizer.step()
        self.parameterisation.after_step(self.latent, (self.low, self.high))
        self.step += 1
        return metrics

    def nonfinite_terms(self) -> list[str]:
        """[] while the last step's loss and images are finite, else the terms that are not (the
        loss itself when no single term is). One host sync: ask only where the loop syncs anyway."""
        loss, values = self._last
        if bool(torch.isfinite(loss).all() & torch.isfinite(self.latent).all()):
            return []
        return [name for name, value in values.items() if not torch.isfinite(value).all()] or ["loss"]

    def close(self) -> None:
        """Leave the (shared) model as it was: no recording hooks, no recomputation."""
        self._undo.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _metrics(self, loss, values, logits, lr) -> dict:
        with torch.no_grad():
            probs = logits.softmax(-1)  # [B, n, V]
            p_token = probs.gather(-1, self.targets.expand(probs.shape[0], -1).unsqueeze(-1))[..., 0]
            mean_probs = probs.mean(0)
            top_p, top_ids = mean_probs.topk(5, dim=-1)
            decode = self.adapter.tokenizer.convert_ids_to_tokens
            return {
                "step": self.step + 1, "lr": lr, "loss": float(loss),
                "terms": {name: float(v) for name, v in values.items()},
                "grad_norm": float(self.latent.grad.norm()),
                "p_target": p_token.mean(0).tolist(),  # per target token, mean over images
                "p_answer": float(p_token.prod(-1).mean()),  # whole answer, mean over images
                "top5": [list(zip(decode(ids.tolist()), [round(p, 4) for p in ps.tolist()]))
                         for ids, ps in zip(top_ids, top_p)],
            }

    # -- resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a bit-identical resume needs, as the step and flat tensors (nothing that needs
        pickle): the images (and the latent, when it is not the pixels), Adam's moments, the RNG."""
        tensors = {"images": self.images.detach().cpu(), "generator": self.generator.get_state()}
        if not self.parameterisation.latent_is_image:
            tensors["latent"] = self.latent.detach().cpu()
        adam = self.optimizer.state[self.latent]
        for key in ADAM_MOMENTS:
            tensors[key] = adam[key].detach().cpu()
        return {"step": self.step, "tensors": tensors}

    def state_layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The shape and dtype of each tensor `state_dict` holds (after the first step)."""
        latent = (tuple(self.latent.shape), self.latent.dtype)
        layout = {"images": (tuple(self.images.shape), self.images.dtype),
                  "generator": (tuple(self.generator.get_state().shape), torch.uint8),
                  **{key: latent for key in ADAM_MOMENTS}}
        if not self.parameterisation.latent_is_image:
            layout["latent"] = latent
        return layout

    def load_state_dict(self, state: dict) -> None:
        tensors = state["tensors"]
        with torch.no_grad():
            self.latent.copy_(tensors.get("latent", tensors["images"]).to(self.latent.device))
        # Adam's parameter groups follow from the config (the lr is set every step), and it steps
        # once per inversion step: only the moments are stored
        self.optimizer.state[self.latent] = {"step": torch.tensor(float(state["step"])),
                                             **{key: tensors[key].to(self.latent) for key in ADAM_MOMENTS}}
        self.generator.set_state(tensors["generator"])
        self.step = int(state["step"])
