"""The core's own plugin: the objective terms of the MIMIC method, and the default answers to the
engine's questions. Registered like any other plugin; the answers are `trylast`, so a plugin's
answer to the same question comes first (pytest's pattern)."""
from .hookspecs import hookimpl


@hookimpl
def register_objectives(register):
    from . import terms  # torch is imported only when objectives are asked for

    for spec in terms.BUILTIN_TERMS:
        register(spec)


@hookimpl(trylast=True)
def mimic_load_model(spec, source, options):
    return spec.load_class().load(source, **options.as_kwargs(), spec=spec)


@hookimpl(trylast=True)
def mimic_vision_sites(adapter, selection):
    from .sites import select_sites

    return select_sites(adapter.vision_sites(), selection)


@hookimpl(trylast=True)
def mimic_format_prompt(adapter, turns, target, image_turns):
    return adapter.build_prompt(turns, target, image_turns=image_turns)
