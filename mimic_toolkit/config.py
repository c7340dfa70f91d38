"""The settings of one inversion run. Precedence: built-in defaults < the adapter's defaults <
`--config FILE` < command-line flags. The resolved config is saved in the run folder."""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import yaml

from .errors import UserError
from .sites import SELECTION_HELP
from .specs import terms_on


MEMORY_SAVING = ("off", "selective", "layers")
# what `transforms.py` and `parameterisations.py` parse (kept here: reading settings must not import torch)
TRANSFORMS_HELP = ("comma list of crop:A-B (random resized crop of area A..B of the image), shift:J (up to J px, "
                   "padded with the image's mean colour), flip (horizontal, half the time), colour:S (per-channel "
                   "gain and offset of up to S), blur:S (Gaussian, sigma up to S px), rotate:D (a turn of up to "
                   "+-D degrees, the corners filled the same way); default: shift by --jitter and flip by --flip")
PARAMETERISATION_HELP = ("pixel (optimise the pixels: the paper's) | fourier[:D] (a 1/f^D-scaled spectrum behind a "
                         "sigmoid, D 1 unless given, up to 3: smooth, large structures rather than pixel-level "
                         "noise; a larger D, larger and smoother) | lowres:F (an image F times smaller, upsampled "
                         "bilinearly, behind a sigmoid)")

# the panels of `mimic invert --help`, in their order there
PANELS = WHAT, OPTIMISATION, OBJECTIVE, RUN = "What to invert", "Optimisation", "Objective", "Execution and outputs"


def setting(default=MISSING, help: str = "", panel: str = RUN, *, short: str | None = None, path: bool = False,
            flag: bool = True, default_factory=MISSING, valid: tuple = (None, None)):
    """A config field with its documentation, from which the CLI derives its option (`--field-name`,
    booleans `--name/--no-name`): `short` adds an alias, `path` takes a path (stored as a string),
    `flag=False` makes it a config-file setting only. `valid`: a number's (lowest, highest) value,
    None for no bound (every float must also be finite)."""
    return field(default=default, default_factory=default_factory,
                 metadata={"help": help, "panel": panel, "short": short, "path": path, "flag": flag, "valid": valid})


@dataclass
class InversionConfig:
    """The one definition of the settings: `mimic invert` (and `sweep`, `compare`) derive their
    options from these fields (`cli_settings.with_settings`)."""

    # None: the registry's default model (the bundled toy model says `default=True`)
    model: str | None = setting(None, "Adapter id (`mimic models`); default: the bundled toy model.", WHAT,
                                short="-m")
    checkpoint: str | None = setting(None, "Local checkpoint folder or hub id.", WHAT)
    revision: str | None = setting(None, "Hub revision of the checkpoint.", WHAT)
    prompts: str | None = setting(None, "Prompt file (JSON: class_index, class_name, chat_sequence); default: "
                                  "the model's own, else the ImageNet 20.", WHAT, path=True)
    class_index: int | None = setting(None, "Concept from the prompt file (default: its first).", WHAT)
    question: str | None = setting(None, "Invert this question...", WHAT)
    answer: str | None = setting(None, "...with this target answer.", WHAT)
    stats: str | None = setting(None, "Feature-statistics file (or folder of them, one per class) from "
                                "`mimic stats`; needed while the feature scale is > 0.", WHAT, path=True)
    objective: str | None = setting(None, "Maximise a direction inside the LM instead of the answer (the lm "
                                    "term): concept:FILE:K | neuron:lm.I:J | direction:FILE.", WHAT)
    objective_positions: str = setting("last-prompt", "Where the objective reads: last-prompt | image.", WHAT)
    iterations: int = setting(5000, "Optimisation steps.", OPTIMISATION, valid=(1, None))
    batch_size: int = setting(4, "Images optimised together.", OPTIMISATION, valid=(1, None))
    # 0 <= min_lr <= lr, lr > 0: checked together
    lr: float = setting(0.3, "Initial learning rate (cosine decay).", OPTIMISATION)
    min_lr: float = setting(1e-5, "Final learning rate.", OPTIMISATION)
    # below the image side too (a larger shift moves the image out of view): checked with the resolution
    jitter: int = setting(30, "Random shift in pixels (padded with the image's mean colour). Given without "
                              "--transforms, it (or --flip) replaces a model's default --transforms.", OPTIMISATION,
                          valid=(0, None))
    flip: bool = setting(True, "Random horizontal flips.", OPTIMISATION)
    transforms: str | None = setting(None, f"Augmentations: {TRANSFORMS_HELP}.", OPTIMISATION)
    views: int = setting(1, "Augmented views of each image per step, losses averaged (an augmentation ensemble).",
                         OPTIMISATION, valid=(1, None))
    seed: int = setting(0, "Random seed.", OPTIMISATION, valid=(0, 2 ** 63 - 1))  # torch's seeds are 64-bit
    init: str = setting("noise", "noise (standard normal; 0.01 on the spectrum for fourier) | blank", OPTIMISATION)
    parameterisation: str = setting("pixel", PARAMETERISATION_HELP, OPTIMISATION)
    resolution: int | None = setting(None, "Image side (default: the model's native).", OPTIMISATION, valid=(1, None))
    scales: dict[str, float] = setting(help="Objective term -> scale (0 = off); on the command line --scale "
                                       "NAME=VALUE and --TERM-loss-scale.", flag=False, default_factory=dict)
    feature_form: str = setting("l2", "l2 (the paper's L_base) | kl (a per-channel Gaussian KL)", OBJECTIVE)
    feature_sites: str | None = setting(
        None, f"Vision-tower sites for the feature statistics: {SELECTION_HELP} (default: the patch embedding and "
        "every layer's MLP).", OBJECTIVE)
    guide: str = setting("resnet50", "Guide network of the guide term (R_V, a CNN's BatchNorm statistics; "
                         "plugins add more: register_guides); loaded only while that term's scale is > 0; the "
                         "model's defaults may name their own.", OBJECTIVE)
    guide_weights: str | None = setting(None, "Safetensors file of the guide's state dict (default: the guide's own; "
                                        "resnet50 has none).", OBJECTIVE, path=True)
    device: str = setting("auto", "auto (cuda if available, else cpu) | cpu | cuda | cuda:N")
    device_map: str | None = setting(None, "auto: spread a model too large for one GPU over all visible GPUs.")
    compile: bool = setting(False, "torch.compile the step (model + objective): faster after a warm-up.")
    memory_saving: str = setting(
        "off", "Recompute activations in the backward pass instead of keeping them: off | selective (the MLP "
        "blocks and norms: most of the memory, two of each layer's seven matmuls) | layers (whole layers: least "
        "memory, most time).")
    dtype: str = setting("auto", "auto (bfloat16 on cuda, float32 on cpu) | float32 | bfloat16 | float16")
    trust_remote_code: bool = setting(False, "Run the checkpoint's own modelling code (transformers' "
                                      "trust_remote_code).")
    outputs: str | None = setting(None, "Run folder (default runs/<model>-<class>-<time>).", path=True)
    log_every: int = setting(50, "Log metrics every N steps.", valid=(1, None))
    grid_every: int = setting(500, "Save an image grid every N steps.", valid=(1, None))
    checkpoint_every: int = setting(500, "Save a resumable checkpoint every N steps.", valid=(1, None))

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self, known_terms) -> None:
        """Every setting's range and choices, before anything loads."""
        for f in fields(self):
            value, (low, high) = getattr(self, f.name), f.metadata["valid"]
            name = f.name.replace("_", "-")
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{name} must be a finite number, not {value}")
            if value is not None and (low is not None and value < low or high is not None and value > high):
                bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
                raise UserError(f"{name} must be {bounds}, not {value}")
        for term, scale in self.scales.items():
            if not math.isfinite(scale):
                raise UserError(f"the scale of '{term}' must be a finite number, not {scale}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError(f"need 0 <= min-lr <= lr and lr > 0 (lr={self.lr}, min-lr={self.min_lr})")
        from . import parameterisations, transforms

        if self.transforms:
            transforms.parse(self.transforms)
        if self.init not in ("noise", "blank"):
            raise UserError(f"init must be 'noise' or 'blank', not '{self.init}'")
        parameterisations.parse(self.parameterisation)
        if self.memory_saving not in MEMORY_SAVING:
            raise UserError(f"memory-saving must be one of {', '.join(MEMORY_SAVING)}, not '{self.memory_saving}'")
        if self.feature_form not in ("l2", "kl"):
            raise UserError(f"feature-form must be 'l2' or 'kl', not '{self.feature_form}'")
        if self.objective_positions not in ("last-prompt", "image"):
            raise UserError(f"objective-positions must be last-prompt or image, not '{self.objective_positions}'")
        needing = terms_on(known_terms, "lm_objective", self.scales)
        if needing and not self.objective:
            raise UserError(f"the {needing[0]} term needs --objective concept:FILE:K | neuron:lm.I:J | direction:FILE")
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
        if name == "scales" and not isinstance(value, (dict, type(None))):  # merged before types are checked
            raise UserError(f"{where}: 'scales' must be a mapping of term names to numbers, not {value!r}")
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


def field_type(f) -> type:
    """The type of a field, None aside (the annotations are strings here)."""
    return _TYPES[f.type.replace(" | None", "")]


def _check_types(config: InversionConfig) -> None:
    for f in fields(InversionConfig):
        value = getattr(config, f.name)
        expected = field_type(f)
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
