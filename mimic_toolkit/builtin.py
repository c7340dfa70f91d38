"""The core's own plugin: the objective terms of the MIMIC method, registered like any other."""
from .hookspecs import hookimpl


@hookimpl
def register_objectives(register):
    from . import terms  # torch is imported only when objectives are asked for

    for spec in terms.BUILTIN_TERMS:
        register(spec)
