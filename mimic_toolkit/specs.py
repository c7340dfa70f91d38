"""Typed records a plugin registers. Plain data: importing this module never imports torch."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class AdapterSpec:
    """A model a plugin provides.

    id: the name users type (`--model ID`); aliases: other accepted names.
    adapter: "package.module:ClassName" of the `VLMAdapter` subclass, imported on first use.
    resolution: native input side in pixels (what `mimic models` shows; the loaded checkpoint's
        own config is authoritative once loaded).
    defaults: inversion hyperparameters for this model (any `InversionConfig` field, and
        `scales: {term: value}`); user config files and flags override them.
    checkpoint: a default checkpoint (local folder or hub id) used when `--checkpoint` is not given.
    prompts: the model's own default prompt file (else the bundled ImageNet prompts).
    stats: default feature statistics: a file, or a folder of per-concept files.
    tested_transformers: the transformers versions this adapter was tested with.
    untuned: the defaults were not tuned on this model (the LLaVA defaults scaled by resolution);
        `mimic models` says so.
    default: the model commands use when none is named (the bundled toy model says so; a
        plugin's claim counts only when no built-in makes one).
    """

    id: str
    adapter: str
    aliases: tuple[str, ...] = ()
    resolution: int = 0
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    checkpoint: str | None = None
    prompts: str | None = None
    stats: str | None = None
    tested_transformers: str = ""
    untuned: bool = False
    default: bool = False
    plugin: str = ""  # filled in by the registry: the plugin that registered it

    def load_class(self):
        return load_dotted(self.adapter)


def load_dotted(path: str):
    """The object "package.module:name" names, imported now (so registering never imports it)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class LoadOptions:
    """How `mimic_load_model` is asked to load: dtype (a torch.dtype), device ("cpu", "cuda:0";
    ignored under a device_map), device_map (None or "auto": accelerate places the layers),
    revision (of a hub checkpoint), trust_remote_code."""

    dtype: Any
    device: str = "cpu"
    device_map: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False

    def as_kwargs(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class ObjectiveSpec:
    """An objective term: `term(ctx) -> scalar tensor`, weighted by its scale (0 = off).
    `reads` declares what the term looks at beyond the pixels, so the engine prepares exactly that:
    "answer" (the target's logits), "vision_statistics" (the tower's feature statistics and the
    --stats targets), "lm_objective" (the hidden state the --objective direction is read at) and
    "guide" (the run's guide network, `GuideSpec`, built and loaded only for such a term)."""

    name: str
    term: Callable[..., Any]
    default_scale: float = 0.0
    description: str = ""
    plugin: str = ""
    reads: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = set(self.reads) - set(TERM_INPUTS)
        if unknown:
            raise ValueError(f"objective term '{self.name}' reads {sorted(unknown)}; known: {', '.join(TERM_INPUTS)}")


TERM_INPUTS = ("answer", "vision_statistics", "lm_objective", "guide")


def terms_reading(specs: dict[str, "ObjectiveSpec"], what: str) -> list[str]:
    """The names of the terms that read `what` (one of TERM_INPUTS)."""
    return [name for name, spec in specs.items() if what in spec.reads]


def terms_on(specs: dict[str, "ObjectiveSpec"], what: str, scales: dict[str, float]) -> list[str]:
    """The terms that read `what` and are on (a non-zero scale) in `scales`."""
    return [name for name in terms_reading(specs, what) if scales.get(name)]


@dataclass(frozen=True)
class GuideSpec:
    """A guide network for the `guide` term (R_V, DeepInversion's BatchNorm prior): a CNN whose
    BatchNorm layers' running statistics describe real images.

    id: the name users give (`--guide ID`).
    builder: "package.module:callable" returning the `torch.nn.Module` (random weights; the core
        loads the weights file into it), imported only when a run uses the guide.
    weights: the default weights file (safetensors, the module's state dict), or None: the user
        must give `--guide-weights`.
    mean, std: the input normalisation the network was trained with, per RGB channel.
    input_size: the side images are resized to before the network sees them; None: as they are.
    """

    id: str
    builder: str
    weights: str | None = None
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    input_size: int | None = None
    description: str = ""
    plugin: str = ""  # filled in by the registry

    def build(self):
        return load_dotted(self.builder)()
