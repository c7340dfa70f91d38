"""The adapter contract: everything the toolkit knows about one VLM lives in its adapter.

The core (inversion loop, statistics, CLI) only calls the methods below and never asks which model
it has. A new VLM is one subclass plus an `AdapterSpec` registered by a plugin. Most LLaVA-like
models need only the class attributes and `feature_sites`; models whose image input is not a
plain [B, 3, H, W] batch override `pixel_inputs` (and `text_inputs` for extra text-side inputs).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from torch.utils.checkpoint import checkpoint

from .errors import UserError
from .specs import AdapterSpec

IGNORE_INDEX = -100
IMAGE_MARKER = "\x00MIMIC_IMAGE\x00"  # stands in for the image while the chat template renders


@dataclass
class Prompt:
    """A tokenised chat with the image in the first user turn and the target answer last.

    input_ids / labels: [L]; labels are IGNORE_INDEX everywhere but on the target tokens.
    image_positions: indices of the image tokens in input_ids.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    image_positions: torch.Tensor

    def __post_init__(self):
        # computed once: the step must not read tensors back to the host
        self.target_ids = self.input_ids[self.labels != IGNORE_INDEX]
        self.n_target = len(self.target_ids)


class VLMAdapter:
    """Base class of every model adapter. Subclasses set the class attributes and implement
    `patch_embedding`, `vision_layers`, `vision_forward`, `image_token_count` and `tiny`."""

    model_class: str = ""  # transformers class name, e.g. "LlavaForConditionalGeneration"
    model_type: str = ""  # the checkpoint config's model_type, e.g. "llava"
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_resample: int = Image.BICUBIC  # the filter the model's own processor resizes with
    # The model's chat format as a Jinja template over string contents; None: the tokenizer's own.
    chat_template: str | None = None

    def __init__(self, model, tokenizer, spec: AdapterSpec | None = None):
        self.model = model.eval().requires_grad_(False)  # frozen: only the image is optimised
        self.tokenizer = tokenizer
        self.spec = spec
        self.registry = None  # the plugins it was loaded through (`engine.load_model`); None: the default
        self.checkpoint = None  # the folder or hub id it was loaded from
        self._step_inputs = None  # (prompt, batch size, inputs) of the last `target_logits`

    @property
    def model_id(self) -> str:
        """The id it was registered under ("" for an adapter built in code)."""
        return self.spec.id if self.spec else ""

    # -- loading --------------------------------------------------------------------------
    @classmethod
    def load(cls, checkpoint: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
             device_map: str | None = None, revision: str | None = None, trust_remote_code: bool = False,
             spec: AdapterSpec | None = None) -> "VLMAdapter":
        """Load from a local folder or a hub id (the hub needs a network). With `device_map`
        ("auto"), accelerate places the layers over the visible devices instead of `device`."""
        import transformers

        _quiet_transformers()
        source = checkpoint_source(checkpoint)
        config = load_config(source, revision, trust_remote_code)
        if config.model_type != cls.model_type:
            raise UserError(f"'{checkpoint}' holds a {config.model_type} model, not {cls.model_type}; "
                            "choose the matching --model")
        model_cls = getattr(transformers, cls.model_class)
        try:
            model = model_cls.from_pretrained(source, config=config, dtype=dtype, revision=revision,
                                              trust_remote_code=trust_remote_code, device_map=device_map)
            tokenizer = cls.load_tokenizer(source, revision=revision, trust_remote_code=trust_remote_code)
        except OSError as exc:
            raise UserError(f"could not load '{checkpoint}': {str(exc).splitlines()[0]}") from exc
        return cls(model if device_map else model.to(device), tokenizer, spec=spec)

    @classmethod
    def load_tokenizer(cls, source: str, **kwargs):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, **kwargs)

    @classmethod
    def tiny(cls, seed: int = 0) -> "VLMAdapter":
        """A randomly initialised model of this adapter's layout, a few hundred k parameters."""
        raise NotImplementedError

    @classmethod
    def benchmark_config(cls, size: str):
        """The transformers config of a random-initialised model for `benchmarks/step_time.py`:
        "full" = the public checkpoint's exact architecture, "mid" = the same layout and image-token
        count with narrow, shallow layers and a small vocabulary (seconds per step on a CPU)."""
        raise NotImplementedError(f"{cls.__name__} declares no benchmark architectures: "
                                  "implement the classmethod benchmark_config(size)")

    def save(self, folder: str | os.PathLike) -> None:
        """Write a checkpoint folder that `load` reads back (used for tiny test checkpoints)."""
        _quiet_transformers()
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    # -- geometry and normalisation --------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where images go: the device of the first layer (with a device map, the input's)."""
        return self.model.get_input_embeddings().weight.device

    @contextmanager
    def activation_checkpointing(self, level: str):
        """Recompute activations in the backward pass instead of keeping them, while inside.
        "selective": the modules of `selectively_recomputed`, which keep most of the memory and
        cost little to recompute. "layers": whole layers (transformers' gradient checkpointing, which
        acts only on layers in training mode: with frozen weights and no dropout nothing else
        changes). "off": nothing. The gradient is the same in every level."""
        if level == "layers":
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for module in self.model.modules():
                if getattr(module, "gradient_checkpointing", False):
                    module.train()
        blocks = self.selectively_recomputed() if level == "selective" else []
        own_forwards = [block.__dict__.get("forward") for block in blocks]  # accelerate's device hooks live there
        for block in blocks:
            # eval mode has no randomness to replay, so the RNG state is not saved per call
            block.forward = partial(checkpoint, block.forward, use_reentrant=False, preserve_rng_state=False)
        try:
            yield
        finally:
            for block, forward in zip(blocks, own_forwards):
                if forward is None:
                    del block.forward
                else:
                    block.forward = forward
            if level == "layers":  # transformers 5.24 renamed the switch; 5.17 has only the old name
                (getattr(self.model, "activation_checkpointing_disable", None)
                 or self.model.gradient_checkpointing_disable)()
                self.model.eval()

    def selectively_recomputed(self) -> list[torch.nn.Module]:
        """What `activation_checkpointing("selective")` recomputes. The MLP blocks of the vision
        tower (its feature sites named `*.mlp`) and of the language model: their wide hidden
        activations are most of what a frozen model keeps, for two of a layer's matmuls. And the
        language model's RMSNorms, which keep an fp32 copy of their input: recomputed, they keep
        only the input itself, for a few elementwise operations."""
        sites = {**self.feature_sites(), **self.lm_sites()}
        norms = [module for layer in self.language_model.layers for module in layer.children()
                 if type(module).__name__.endswith("RMSNorm")]
        return [module for name, module in sites.items() if name.endswith(".mlp")] + norms

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def resolution(self) -> int:
        return self.model.config.vision_config.image_size

    @property
    def patch_size(self) -> int:
        return self.model.config.vision_config.patch_size

    def use_resolution(self, side: int) -> None:
        """Choose this run's input side. The base accepts only the native resolution; adapters
        of models that take other sizes override this (and `resolution`)."""
        if side != self.resolution:
            raise UserError(f"resolution {side} is not supported: this model takes {self.resolution} px")

    def normalisation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as [3, 1, 1] fp32 tensors on the model's device."""
        kw = dict(device=self.device, dtype=torch.float32)
        return (torch.tensor(self.image_mean, **kw).view(3, 1, 1),
                torch.tensor(self.image_std, **kw).view(3, 1, 1))

    def pixel_box(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid [0, 1] pixel range expressed in normalised space, per channel."""
        mean, std = self.normalisation()
        return (0 - mean) / std, (1 - mean) / std

    def normalise(self, pixels01: torch.Tensor) -> torch.Tensor:
        mean, std = self.normalisation()
        return (pixels01.to(mean.device) - mean) / std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.normalisation()
        return (x * std + mean).clamp(0, 1)

    def preprocess(self, images: list[Image.Image], resolution: int | None = None) -> torch.Tensor:
        """Real images -> normalised [B, 3, R, R] as the model's processor prepares them: shortest
        side resized to R with the processor's filter, centre crop (inversion images are square),
        scaled to [0, 1], normalised."""
        side = resolution or self.resolution
        batch = [_to_tensor(_resize_and_crop(image.convert("RGB"), side, self.image_resample)) for image in images]
        return self.normalise(torch.stack(batch))

    # -- model inputs (differentiable) -----------------------------------------------------
    def pixel_inputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised fp32 images [B, 3, H, W] -> the model's image keyword arguments."""
        return {"pixel_values": images.to(self.dtype)}

    def text_inputs(self, prompt: Prompt, batch_size: int) -> dict[str, torch.Tensor]:
        """The prompt's keyword arguments for a batch of `batch_size` images."""
        ids = prompt.input_ids.to(self.device).unsqueeze(0).expand(batch_size, -1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def teacher_forcing_inputs(self, prompt: Prompt, batch_size: int) -> dict[str, torch.Tensor]:
        """The text-side inputs of `target_logits`: `text_inputs` without the all-ones attention
        mask (with no padding the causal mask alone is the same, and transformers would read an
        explicit one back to the host every step). Adapters add inputs only this forward takes."""
        return {**self.text_inputs(prompt, batch_size), "attention_mask": None}

    def target_logits(self, images: torch.Tensor, prompt: Prompt) -> torch.Tensor:
        """Logits that predict each target token, [B, n_target, vocab], fp32. Only these
        positions go through the LM head (the target is the end of the sequence)."""
        n = prompt.n_target
        out = self.model(**self.pixel_inputs(images), **self._teacher_forcing_inputs_once(prompt, images.shape[0]),
                         logits_to_keep=n + 1, use_cache=False)
        return out.logits[:, :-1].float()

    @torch.compiler.disable  # a compiled step would otherwise be recompiled once the cache is filled
    def _teacher_forcing_inputs_once(self, prompt: Prompt, batch_size: int) -> dict[str, torch.Tensor]:
        """Built on the first step and reused: copying the prompt to the GPU every step would make
        the host wait for the GPU."""
        cached = self._step_inputs
        if cached is None or cached[0] is not prompt or cached[1] != batch_size:
            self._step_inputs = cached = (prompt, batch_size, self.teacher_forcing_inputs(prompt, batch_size))
        return cached[2]

    @torch.no_grad()
    def answer_probability(self, images: torch.Tensor, prompt: Prompt) -> torch.Tensor:
        """P(the prompt's target | image) per normalised image: the product over its tokens, [B]."""
        logp = self.target_logits(images, prompt).log_softmax(-1)
        targets = prompt.target_ids.to(logp.device).expand(len(images), -1)
        return logp.gather(-1, targets[..., None]).sum((1, 2)).exp()

    # -- prompts -----------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def image_token_count(self) -> int:
        raise NotImplementedError

    def image_placeholder_ids(self) -> list[int]:
        """The token ids that stand for one image in `input_ids`, already expanded."""
        return [self.image_token_id] * self.image_token_count()

    def user_content(self, text: str, with_image: bool):
        """A user message's content for the chat template (the image marker goes first). Formats
        that wrap the image in tokens, or put no newline after it, override this with IMAGE_MARKER."""
        return f"{IMAGE_MARKER}\n{text}" if with_image else text

    def build_prompt(self, turns: list[tuple[str, str]], target: bool = True, *, chat_template: str | None = None,
                     system: str | None = None) -> Prompt:
        """Chat turns [(user, assistant), ...] -> Prompt, in this adapter's chat template (or
        `chat_template`), after a `system` message if one is given. The image goes at the start of
        the first user message; the last assistant message is the target (no end-of-turn token
        after it). With `target=False` the last assistant message is left out: a prompt to generate
        from. The core asks for prompts through the `mimic_format_prompt` hook, whose default this is."""
        messages = [{"role": "system", "content": system}] if system else []
        for i, (user, assistant) in enumerate(turns):
            messages.append({"role": "user", "content": self.user_content(user, with_image=i == 0)})
            if i < len(turns) - 1:
                messages.append({"role": "assistant", "content": assistant})
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                  chat_template=chat_template or self.chat_template)
        before, after = text.split(IMAGE_MARKER)
        encode = lambda s: self.tokenizer(s, add_special_tokens=False).input_ids  # the template has BOS
        image = self.image_placeholder_ids()
        prompt_ids = encode(before) + image + encode(after)
        target_ids = encode(turns[-1][1]) if target else []
        if target and not target_ids:
            raise UserError("the target answer is empty")
        ids = torch.tensor(prompt_ids + target_ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[len(prompt_ids):] = ids[len(prompt_ids):]
        start = len(encode(before))
        return Prompt(ids, labels, torch.arange(start, start + len(image)))

    # -- language model --------------------------------------------------------------------
    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder stack (embeddings, `layers`, final `norm`). transformers' `get_decoder`
        finds it in every layout we support; adapters of other layouts override this."""
        return self.model.get_decoder()

    def lm_sites(self) -> dict[str, torch.nn.Module]:
        """Named language-model sites: `lm.{i}` (residual stream after decoder layer i),
        `lm.{i}.attn` and `lm.{i}.mlp` (the branch outputs, before the residual add) and
        `lm.final_norm`. Adapters whose layers name their branches otherwise override this."""
        sites = {}
        for i, layer in enumerate(self.language_model.layers):
            sites[f"lm.{i}"] = layer
            sites[f"lm.{i}.attn"] = layer.self_attn
            sites[f"lm.{i}.mlp"] = layer.mlp
        sites["lm.final_norm"] = self.language_model.norm
        return sites

    def lm_site(self, name: str) -> torch.nn.Module:
        sites = self.lm_sites()
        if name not in sites:
            last = len(self.language_model.layers) - 1
            raise UserError(f"this model has no site '{name}' (sites: lm.0 .. lm.{last}, lm.I.attn, lm.I.mlp, "
                            "lm.final_norm)")
        return sites[name]

    @property
    def hidden_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[1]

    def unembed(self, hidden: torch.Tensor, apply_final_norm: bool = True) -> torch.Tensor:
        """Hidden states [..., D] -> fp32 logits [..., vocab] through the LM head, after the
        final norm unless `apply_final_norm` is False (states taken after that norm)."""
        head = self.model.get_output_embeddings()
        hidden = hidden.to(head.weight.device, head.weight.dtype)
        if apply_final_norm:
            hidden = self.language_model.norm(hidden)
        return head(hidden).float()

    def end_token_ids(self) -> list[int]:
        """Tokens that end an answer: the tokenizer's end token and the model's own."""
        ends = self.model.generation_config.eos_token_id
        ends = ends if isinstance(ends, list) else [ends]
        return sorted({i for i in [self.tokenizer.eos_token_id, *ends] if i is not None})

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompt: Prompt, max_new_tokens: int) -> torch.Tensor:
        """Greedy answers for a batch of normalised images with one shared prompt: the new
        token ids [B, T] (rows that ended early are padded)."""
        from transformers import GenerationConfig

        ends = self.end_token_ids()
        pad = self.tokenizer.pad_token_id
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=ends,
                                  pad_token_id=ends[0] if pad is None else pad)
        out = self.model.generate(**self.pixel_inputs(images), **self.text_inputs(prompt, images.shape[0]),
                                  generation_config=config)
        return out[:, len(prompt.input_ids):]

    # -- vision tower ----------------------------------------------------------------------
    @property
    def patch_embedding(self) -> torch.nn.Module:
        """The vision tower's patch embedding (its output: before any position embedding)."""
        raise NotImplementedError

    @property
    def vision_layers(self) -> list[torch.nn.Module]:
        """The vision tower's encoder layers, in order; each has an `mlp` and a `self_attn` (or `attn`)."""
        raise NotImplementedError

    def vision_sites(self) -> dict[str, torch.nn.Module]:
        """Every vision-tower site under its canonical name (`mimic_toolkit.sites`), built from
        `patch_embedding` and `vision_layers`; adapters of other layouts override this."""
        if type(self).feature_sites is not VLMAdapter.feature_sites:
            return self.feature_sites()  # an adapter written to the old contract names its sites itself
        sites = {"vision.patch_embedding": self.patch_embedding}
        for i, layer in enumerate(self.vision_layers):
            sites[f"vision.layers.{i}"] = layer
            sites[f"vision.layers.{i}.attn"] = layer.self_attn if hasattr(layer, "self_attn") else layer.attn
            sites[f"vision.layers.{i}.mlp"] = layer.mlp
        return sites

    def feature_sites(self) -> dict[str, torch.nn.Module]:
        """The default sites of the feature statistics: the patch embedding and every layer's MLP.
        A run's own choice (`--feature-sites`) goes through the `mimic_vision_sites` hook."""
        from .sites import select_sites

        return select_sites(self.vision_sites(), None)

    def site_tokens(self, site: str, output, batch_size: int) -> torch.Tensor:
        """A site's output -> [B, tokens, channels]. Handles [B, T, D] and conv maps [B, D, h, w];
        adapters with packed outputs (no batch dimension) override it."""
        if isinstance(output, tuple):
            output = output[0]
        if output.dim() == 4:
            return output.flatten(2).transpose(1, 2)
        return output

    def vision_forward(self, images: torch.Tensor) -> None:
        """Run only the vision tower on normalised images (what feature statistics need)."""
        raise NotImplementedError


def _quiet_transformers() -> None:
    """No per-shard progress bars: our own panel reports progress."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def checkpoint_source(checkpoint: str) -> str:
    """A local model folder (its path) or a hub id; anything else is one clear error."""
    local = Path(checkpoint).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"'{checkpoint}' is not a model folder (it has no config.json)")
        return str(local)
    parts = checkpoint.split("/")
    if len(parts) == 2 and all(parts) and not checkpoint.startswith((".", "~")):
        return checkpoint
    raise UserError(f"checkpoint folder '{checkpoint}' does not exist")


def load_config(source: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"could not read the model config of '{source}': {str(exc).splitlines()[0]}") from exc


def _resize_and_crop(image: Image.Image, side: int, resample: int) -> Image.Image:
    scale = side / min(image.size)
    w, h = max(side, round(image.width * scale)), max(side, round(image.height * scale))
    image = image.resize((w, h), resample)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255
