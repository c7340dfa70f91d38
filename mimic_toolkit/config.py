"""The settings of one inversion run. Precedence: built-in defaults < the adapter's defaults <
`--config FILE` < command-line flags. The resolved config is saved in the run folder."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from .errors import UserError


MEMORY_SAVING = ("off", "selective", "layers")


@dataclass
class InversionConfig:
    # what to invert
    model: str = "toy-shapes"  # the bundled model: runs anywhere, no download
    checkpoint: str | None = None
    revision: str | None = None
    prompts: str | None = None  # prompt file; default: the adapter's own, else the ImageNet 20
    class_index: int | None = None  # default: the first entry of the prompt file
    question: str | None = None  # with answer: invert this instead of a prompt-file entry
    answer: str | None = None
    stats: str | None = None  # feature-statistics file (needed while the feature scale > 0)
    objective: str | None = None  # concept:FILE:K | neuron:lm.I:J | direction:FILE (the "lm" term)
    objective_positions: str = "last-prompt"  # where the objective reads the LM: last-prompt | image
    # optimisation
    iterations: int = 5000
    batch_size: int = 4
    lr: float = 0.3
    min_lr: float = 1e-5
    jitter: int = 30  # pixels of random shift (reflect-padded)
    flip: bool = True
    seed: int = 0
    init: str = "noise"  # "noise" (standard normal; 0.01 on the spectrum for fourier) or "blank"
    # "pixel": optimise the pixels (the paper's); "fourier": optimise a 1/f-scaled spectrum behind a
    # sigmoid (lucid-style), which favours smooth, large structures over pixel-level noise
    parameterisation: str = "pixel"
    resolution: int | None = None  # default: the model's native resolution
    scales: dict[str, float] = field(default_factory=dict)  # objective term -> scale (0 = off)
    feature_form: str = "l2"  # "l2" (the paper's L_base) or "kl"
    # execution and outputs
    device: str = "auto"  # "auto": cuda if available, else cpu
    device_map: str | None = None  # "auto": spread a model too large for one GPU over all visible GPUs
    compile: bool = False  # torch.compile the step (model + objective): faster after a warm-up
    # recompute activations in the backward pass instead of keeping them: "selective" the MLP
    # blocks and norms (most of the memory, two of each layer's seven matmuls), "layers" whole
    # layers (least memory, most time)
    memory_saving: str = "off"
    dtype: str = "auto"  # "auto": bfloat16 on cuda, float32 on cpu
    trust_remote_code: bool = False
    outputs: str | None = None  # run folder; default runs/<model>-<class>-<time>
    log_every: int = 50
    grid_every: int = 500
    checkpoint_every: int = 500

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self, known_terms) -> None:
        positive = ("iterations", "batch_size", "log_every", "grid_every", "checkpoint_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError(f"need 0 <= min-lr <= lr and lr > 0 (lr={self.lr}, min-lr={self.min_lr})")
        if self.jitter < 0:
            raise UserError("jitter must be >= 0")
        if self.init not in ("noise", "blank"):
            raise UserError(f"init must be 'noise' or 'blank', not '{self.init}'")
        if self.parameterisation not in ("pixel", "fourier"):
            raise UserError(f"parameterisation must be 'pixel' or 'fourier', not '{self.parameterisation}'")
        if self.memory_saving not in MEMORY_SAVING:
            raise UserError(f"memory-saving must be one of {', '.join(MEMORY_SAVING)}, not '{self.memory_saving}'")
        if self.feature_form not in ("l2", "kl"):
            raise UserError(f"feature-form must be 'l2' or 'kl', not '{self.feature_form}'")
        if self.objective_positions not in ("last-prompt", "image"):
            raise UserError(f"objective-positions must be last-prompt or image, not '{self.objective_positions}'")
        if self.scales.get("lm") and not self.objective:
            raise UserError("the lm term needs --objective concept:FILE:K | neuron:lm.I:J | direction:FILE")
        if (self.question is None) != (self.answer is None):
            raise UserError("--question and --answer go together")
        unknown = sorted(set(self.scales) - set(known_terms))
        if unknown:
            raise UserError(f"unknown objective term '{unknown[0]}' (known: {', '.join(sorted(known_terms))})")


FIELDS = {f.name for f in fields(InversionConfig)}


def read_config_file(path) -> dict:
    """A YAML (or JSON) mapping of InversionConfig fields; kebab-case keys are accepted."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping of settings")
    return normalise_keys(data, f"config file '{path}'")


def normalise_keys(data: dict, where: str) -> dict:
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise UserError(f"{where}: unknown setting '{key}'")
        out[name] = value
    return out


def resolve(layers: list[dict]) -> InversionConfig:
    """Merge setting layers, later ones winning; `scales` merge per term."""
    merged: dict = {"scales": {}}
    for layer in layers:
        for key, value in layer.items():
            if key == "scales":
                merged["scales"].update(value or {})
            elif value is not None:
                merged[key] = value
    try:
        config = InversionConfig(**merged)
    except TypeError as exc:
        raise UserError(f"bad settings: {exc}") from exc
    _check_types(config)
    return config


_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "dict[str, float]": dict}


def _check_types(config: InversionConfig) -> None:
    for f in fields(InversionConfig):
        value = getattr(config, f.name)
        expected = _TYPES[f.type.replace(" | None", "")]
        if value is None and "None" in f.type:
            continue
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, f.name, float(value))
        elif not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise UserError(f"setting '{f.name}' must be {expected.__name__}, got {value!r}")
    for term, scale in config.scales.items():
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise UserError(f"scale of '{term}' must be a number, got {scale!r}")
        config.scales[term] = float(scale)
