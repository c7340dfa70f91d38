"""Sparse autoencoders (SAEs) on a model's hidden states: the model, its SAELens on-disk layout,
and sparse codes.

    z = act((x / s - b_dec * apply_b_dec) @ W_enc + b_enc)        x_hat = s * (z @ W_dec + b_dec)

`act` is TopK (keep the k largest, ReLU), ReLU, or JumpReLU (z = ReLU(pre) where pre > threshold).
`s` is the input scale: training divides inputs by their mean norm over sqrt(d_in) (so rows have
norm sqrt(d_in) on average) and stores it; writing folds it into the weights, so a file is an
ordinary SAE of raw hidden states (SAELens's `normalize_activations: none`).

An SAE folder holds SAELens's files, which `mimic sae import` reads from any SAELens folder
(Gemma Scope, Llama Scope releases a user downloaded) without the `sae-lens` package:
    cfg.json                  architecture, d_in, d_sae, k, apply_b_dec_to_input, ... and `mimic`:
                              model, checkpoint, revision, site, tokens, features hash, input scale
    sae_weights.safetensors   W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec (, threshold)
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .errors import UserError
from .jsonfile import read_json_lines
from .tensorfile import read_safetensors

ARCHITECTURES = ("topk", "relu", "jumprelu")
SAELENS_NAMES = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu"}  # ours -> SAELens's
CODES_FORMAT = "mimic-sae-codes/1"


class SparseAutoencoder(torch.nn.Module):
    def __init__(self, d_in: int, d_sae: int, architecture: str = "topk", k: int | None = None, *,
                 apply_b_dec_to_input: bool = True, input_scale: float = 1.0):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise UserError(f"--arch must be one of {', '.join(ARCHITECTURES)}, not '{architecture}'")
        if architecture == "topk" and not (k and 1 <= k <= d_sae):
            raise UserError(f"a TopK SAE needs 1 <= k <= width ({d_sae}), not {k}")
        self.architecture, self.k = architecture, k if architecture == "topk" else None
        self.apply_b_dec_to_input, self.input_scale = apply_b_dec_to_input, float(input_scale)
        self.W_enc = torch.nn.Parameter(torch.zeros(d_in, d_sae))
        self.W_dec = torch.nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))
        self.register_buffer("threshold", torch.zeros(d_sae))

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        x = x / self.input_scale
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.architecture == "topk":
            top = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
        if self.architecture == "jumprelu":
            return pre.relu() * (pre > self.threshold)  # as SAELens: a negative threshold still keeps z >= 0
        return pre.relu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes [..., d_sae] of hidden states [..., d_in]."""
        return self.activate(self.pre_activations(x.float()))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (z @ self.W_dec + self.b_dec) * self.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Unit-norm decoder rows (TopK and ReLU training), the encoder's columns rescaled so the
        SAE computes the same function."""
        norms = self.W_dec.norm(dim=1).clamp_min(1e-8)
        self.W_dec /= norms[:, None]
        self.W_enc *= norms[None, :]
        self.b_enc *= norms
        self.threshold *= norms

    def folded(self) -> dict[str, torch.Tensor]:
        """The weights with the input scale folded in (an SAE of raw hidden states, scale 1)."""
        s = self.input_scale
        weights = {"W_enc": self.W_enc / s, "W_dec": self.W_dec * s, "b_enc": self.b_enc, "b_dec": self.b_dec * s}
        if self.architecture == "jumprelu":
            weights["threshold"] = self.threshold
        return {name: tensor.detach().float().contiguous() for name, tensor in weights.items()}


# -- the SAELens layout ------------------------------------------------------------------------------
def save_sae(sae: SparseAutoencoder, folder: Path, mimic: dict) -> None:
    """cfg.json and sae_weights.safetensors into an existing (`.partial`) folder."""
    from safetensors.torch import save_file

    cfg = {"architecture": SAELENS_NAMES[sae.architecture], "d_in": sae.d_in, "d_sae": sae.d_sae,
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": sae.apply_b_dec_to_input,
           "normalize_activations": "none", "hook_name": mimic.get("site", ""), "model_name": mimic.get("model", ""),
           "mimic": {**mimic, "input_scale": sae.input_scale}}
    if sae.k is not None:
        cfg["k"] = sae.k
        cfg["activation_fn_kwargs"] = {"k": sae.k}  # where SAELens before v6 reads it
    save_file(sae.folded(), str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))


def load_sae(folder: str | os.PathLike) -> tuple[SparseAutoencoder, dict]:
    """An SAE folder of ours or of SAELens: (the SAE with scale 1, its cfg.json). Checked here, so
    a foreign or damaged folder is one line naming what is wrong."""
    folder = Path(folder)
    if not (folder / "cfg.json").is_file() or not (folder / "sae_weights.safetensors").is_file():
        raise UserError(f"'{folder}' is not an SAE folder (it needs cfg.json and sae_weights.safetensors)")
    (cfg,) = read_json_lines(folder / "cfg.json", whole=True)
    where = f"SAE folder '{folder}'"
    if not isinstance(cfg, dict):
        raise UserError(f"{where}: cfg.json must hold an object")
    names = {value: ours for ours, value in SAELENS_NAMES.items()}
    architecture = names.get(cfg.get("architecture"))
    if architecture is None:
        raise UserError(f"{where}: architecture {cfg.get('architecture')!r} is not one of "
                        f"{', '.join(SAELENS_NAMES.values())}")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise UserError(f"{where}: normalize_activations {cfg['normalize_activations']!r} needs statistics of the "
                        "SAE's training data, which the folder does not hold; only 'none' is read")
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if architecture == "topk" and not isinstance(k, int):
        raise UserError(f"{where}: a topk SAE needs an integer k in cfg.json")
    tensors, _ = read_safetensors(folder / "sae_weights.safetensors", "SAE weights file")
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    if architecture == "jumprelu":
        shapes["threshold"] = (d_sae,)
    for name, shape in shapes.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            found = tuple(tensors[name].shape) if name in tensors else "missing"
            raise UserError(f"{where}: {name} must be {list(shape)} (d_in {d_in}, d_sae {d_sae}), is {found}")
    sae = SparseAutoencoder(d_in, d_sae, architecture, k, apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)))
    with torch.no_grad():
        for name in shapes:
            getattr(sae, name).copy_(tensors[name].float())
    return sae.requires_grad_(False), cfg


def sae_site(cfg: dict) -> str:
    """The toolkit site an SAE folder reads ("" for a SAELens folder not imported yet)."""
    return (cfg.get("mimic") or {}).get("site", "")


# -- sparse codes --------------------------------------------------------------------------------------
def top_codes(z: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `count` largest codes of each row: (indices int32 [N, count], values fp32 [N, count]);
    a row with fewer active latents has zero values after its active ones."""
    top = z.topk(min(count, z.shape[-1]), dim=-1)
    return top.indices.int(), top.values.float()


def dense_codes(indices: torch.Tensor, values: torch.Tensor, d_sae: int) -> torch.Tensor:
    return torch.zeros(len(indices), d_sae).scatter_(1, indices.long(), values)


def default_width(d_in: int, width: float) -> int:
    """--width is a multiple of the input width."""
    if not math.isfinite(width) or round(d_in * width) < 1:
        raise UserError(f"--width must make at least one latent, not {width}")
    return int(round(d_in * width))
