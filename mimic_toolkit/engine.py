"""The core's three questions to its plugins, asked in one place each: how to load a model, which
vision-tower sites feed the feature statistics, and how to format a prompt (`hookspecs.py`).

An adapter remembers the registry it was loaded through, so every later question about it (its
sites, its prompts) reaches the same plugins; an adapter built in code asks the default registry.
"""
from __future__ import annotations

import time

from . import verbosity
from .errors import UserError
from .specs import LoadOptions

DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_model(name: str | None = None, *, checkpoint: str | None = None, device: str = "auto", dtype: str = "auto",
               device_map: str | None = None, revision: str | None = None, trust_remote_code: bool = False,
               registry=None):
    """The adapter of model `name` (an id or alias from `mimic models`; None: the default model),
    loaded through the `mimic_load_model` hook: from `checkpoint` (a local folder or a hub id; default: the model's
    own), on `device` ("auto": cuda when there is one) in `dtype` ("auto": bfloat16 on cuda)."""
    import torch

    registry = registry or _default_registry()
    spec = registry.adapter_spec(name) if name else registry.default_model()
    source = checkpoint or spec.checkpoint
    if not source:
        raise UserError(f"model '{spec.id}' needs --checkpoint PATH (a local folder or a hub id)")
    device = resolve_device(device)
    if dtype not in DTYPES:
        raise UserError(f"dtype must be {', '.join(DTYPES)}, not '{dtype}'")
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else (
        torch.bfloat16 if device.startswith("cuda") else torch.float32)
    options = LoadOptions(dtype=torch_dtype, device=device, device_map=device_map, revision=revision,
                          trust_remote_code=trust_remote_code)
    started = time.perf_counter()
    adapter = registry.ask("mimic_load_model", spec=spec, source=source, options=options)
    adapter.spec, adapter.registry, adapter.checkpoint = spec, registry, source
    verbosity.say(f"loaded {spec.id} from {source} on {device} ({adapter.dtype}) in "
                  f"{time.perf_counter() - started:.1f} s")
    return adapter


def vision_sites(adapter, selection: str | None = None) -> dict:
    """The vision-tower sites whose statistics a run matches: `selection` (`--feature-sites`)
    resolved by the `mimic_vision_sites` hook; None: the default sites."""
    return _registry_of(adapter).ask("mimic_vision_sites", adapter=adapter, selection=selection)


def format_prompt(adapter, turns: list[tuple[str, str]], target: bool = True, image_turns: tuple[int, ...] = (0,)):
    """Chat turns [(user, assistant), ...] -> `Prompt`, through the `mimic_format_prompt` hook.
    With `target=False` the last assistant message is left out (a prompt to generate from).
    `image_turns`: the turns whose user message carries an image (in-context demonstrations)."""
    return _registry_of(adapter).ask("mimic_format_prompt", adapter=adapter, turns=list(turns), target=target,
                                     image_turns=tuple(image_turns))


def resolve_device(option: str) -> str:
    """'auto' -> cuda when there is one, else cpu; a device this machine lacks is one clear error."""
    import torch

    if option == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(option)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"device must be auto, cpu, cuda or cuda:N, not '{option}'")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count or (device.index or 0) >= count:
            have = ", ".join(["cpu"] + [f"cuda:{i}" for i in range(count)])
            raise UserError(f"device '{option}' does not exist on this machine (it has: {have})")
    return option


def _registry_of(adapter):
    return getattr(adapter, "registry", None) or _default_registry()


def _default_registry():
    from .registry import default_registry

    return default_registry()


def describe_sites(name: str, checkpoint: str | None = None, registry=None) -> tuple[str, dict[str, bool]]:
    """(where the architecture came from, {canonical vision site: in the default selection}) for
    model `name`, without loading weights: the model is built on the meta device from the
    checkpoint's config (`checkpoint`, else the model's own local one), else from the adapter's
    declared full-size architecture."""
    origin, adapter = meta_adapter(name, checkpoint, registry)
    defaults = adapter.feature_sites()
    return origin, {site: site in defaults for site in adapter.vision_sites()}


def meta_adapter(name: str, checkpoint: str | None = None, registry=None):
    """(where the architecture came from, model `name`'s adapter around a weightless model on the
    meta device): what its sites are can be asked before anything loads."""
    from pathlib import Path

    import torch
    import transformers

    registry = registry or _default_registry()
    spec = registry.adapter_spec(name)
    adapter_class = spec.load_class()
    source = checkpoint or spec.checkpoint
    if checkpoint or (source and (Path(source).expanduser() / "config.json").is_file()):
        from .adapter import checkpoint_source, load_config

        config, origin = load_config(checkpoint_source(source), None, False), f"the config of {source}"
    else:
        config, origin = adapter_class.architecture("full"), f"{spec.id}'s declared full-size architecture"
    with torch.device("meta"):
        model = getattr(transformers, adapter_class.model_class)._from_config(config)
    adapter = adapter_class(model, tokenizer=None, spec=spec)
    adapter.registry = registry
    return origin, adapter
