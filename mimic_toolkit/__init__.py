"""mimic-toolkit: see what vision-language models see.

Importing the package is cheap (no torch): plugins import `hookimpl`, `AdapterSpec` and
`ObjectiveSpec` from here.
"""
from .hookspecs import hookimpl
from .specs import AdapterSpec, ObjectiveSpec

__all__ = ["hookimpl", "AdapterSpec", "ObjectiveSpec"]
__version__ = "0.1.0"
