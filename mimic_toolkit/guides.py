"""The guide network of the `guide` term: R_V, MIMIC's naturalness prior, DeepInversion's
BatchNorm-statistics loss (Yin et al., 2020). A frozen CNN sees the images the VLM sees each step;
at every BatchNorm2d layer the batch's per-channel mean and variance of the layer's input are
matched to the running statistics the network kept over real images:

    R_V = sum_l w_l (||mu_l - running_mean_l||_2 + ||var_l - running_var_l||_2),

w = 10 for the first BatchNorm layer the input reaches (DeepInversion's first_bn_multiplier), 1 for
the others. Guides are registered by plugins (`register_guides`); their weights are read from
safetensors files only, so loading one never runs code.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import UserError
from .specs import GuideSpec, terms_on
from .tensorfile import read_safetensors

FIRST_LAYER_WEIGHT = 10.0  # DeepInversion's first_bn_multiplier
WHAT = "guide weights file"


class Guide:
    """A frozen guide network (eval mode: its running statistics never change) with one forward
    pre-hook per BatchNorm2d layer, registered while the guide is entered (`with`). Called on
    images in [0, 1] (any size; resized to the spec's input size), it returns R_V."""

    def __init__(self, spec: GuideSpec, module: torch.nn.Module, weights: Path):
        self.spec, self.weights = spec, weights
        self.module = module.eval().requires_grad_(False)
        self.layers = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        if not self.layers:
            raise UserError(f"guide '{spec.id}' has no BatchNorm2d layer: it has no statistics to match")
        device = next(module.buffers()).device
        self.mean = torch.tensor(spec.mean, device=device).view(3, 1, 1)
        self.std = torch.tensor(spec.std, device=device).view(3, 1, 1)
        self._losses: list[torch.Tensor] = []
        self._handles = []

    def __enter__(self):
        self._handles = [layer.register_forward_pre_hook(self._match) for layer in self.layers]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _match(self, layer, inputs):
        x = inputs[0].float()
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        self._losses.append((mean - layer.running_mean).norm() + (var - layer.running_var).norm())

    def __call__(self, images01: torch.Tensor) -> torch.Tensor:
        """R_V of a batch of images [B, 3, H, W] in [0, 1]; differentiable in the images."""
        if not self._handles:
            raise RuntimeError("enter the guide (`with guide:`) before calling it")
        x = images01.float()
        side = self.spec.input_size
        if side and x.shape[-2:] != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=x.shape[-1] > side)
        self._losses = []
        self.module((x - self.mean) / self.std)
        first, *rest = self._losses  # in the order the input reached the layers
        return FIRST_LAYER_WEIGHT * first + sum(rest)

    def record(self) -> dict:
        """What a run's manifest says of its guide: the id, the weights file and its sha256."""
        return {"id": self.spec.id, "plugin": self.spec.plugin, "weights": str(self.weights),
                "sha256": hashlib.sha256(self.weights.read_bytes()).hexdigest()}


def weights_path(spec: GuideSpec, given: str | None) -> Path:
    """The weights file a run reads: the user's (`--guide-weights`), else the guide's default."""
    path = given or spec.weights
    if not path:
        raise UserError(f"guide '{spec.id}' has no default weights: give --guide-weights FILE (a safetensors "
                        f"file of its state dict; the README's \"The guide prior\" says how to make one)")
    return Path(path).expanduser().resolve()


def read_weights(spec: GuideSpec, path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors, checked against the guide's own state dict (built on the meta device, so
    nothing is allocated): every key there (BatchNorm's num_batches_tracked may be left out), no
    other key, the same shapes. Anything else is one line naming the file and the problem."""
    tensors, _ = read_safetensors(path, WHAT)
    with torch.device("meta"):
        expected = {key: tuple(t.shape) for key, t in spec.build().state_dict().items()}
    missing = [k for k in expected if k not in tensors and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        said = [f"{len(missing)} keys missing ({_first(missing)})" if missing else "",
                f"{len(unexpected)} unexpected keys ({_first(unexpected)})" if unexpected else ""]
        raise UserError(f"'{path}' does not hold the weights of guide '{spec.id}': {'; '.join(s for s in said if s)}")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != expected[key]:
            raise UserError(f"'{path}': tensor '{key}' has shape {list(tensor.shape)}, guide '{spec.id}' needs "
                            f"{list(expected[key])}")
    return tensors


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def load_guide(registry, guide_id: str, weights: str | None, device) -> Guide:
    """Guide `guide_id` with its weights (`weights`, else its default) on `device`, frozen."""
    spec = registry.guide_spec(guide_id)
    path = weights_path(spec, weights)
    tensors = read_weights(spec, path)
    module = spec.build()
    module.load_state_dict(tensors, strict=False)  # strict in all but num_batches_tracked: checked above
    return Guide(spec, module.to(device=device, dtype=torch.float32), path)


def check_guide(registry, config, terms: dict) -> None:
    """Before any work: the run's guide and its weights file, when a term that reads it is on."""
    if terms_on(terms, "guide", config.scales):
        spec = registry.guide_spec(config.guide)
        read_weights(spec, weights_path(spec, config.guide_weights))
