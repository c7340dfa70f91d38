"""mimic-toolkit: see what vision-language models see.

Importing the package is cheap (no torch): plugins import `hookimpl`, `AdapterSpec` and
`ObjectiveSpec` (and `GuideSpec`) from here. The library's functions (`load_model`, `invert`, `compute_stats`,
`capture`, `format_prompt`, `vision_sites`) are imported on first use.
"""
from .hookspecs import hookimpl
from .specs import AdapterSpec, GuideSpec, LoadOptions, ObjectiveSpec

_LIBRARY = {"load_model": "engine", "format_prompt": "engine", "vision_sites": "engine",
            "invert": "library", "compute_stats": "library", "capture": "library"}

__all__ = ["hookimpl", "AdapterSpec", "GuideSpec", "LoadOptions", "ObjectiveSpec", *_LIBRARY]
__version__ = "0.1.0"


def __getattr__(name):
    if name in _LIBRARY:
        import importlib

        return getattr(importlib.import_module(f".{_LIBRARY[name]}", __name__), name)
    raise AttributeError(f"module 'mimic_toolkit' has no attribute '{name}'")
