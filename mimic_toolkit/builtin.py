"""The core's own plugin: the objective terms of the MIMIC method, the reference's guide network
(ResNet-50) and the default answers to the engine's questions. Registered like any other plugin;
the answers are `trylast`, so a plugin's answer to the same question comes first (pytest's pattern)."""
from .hookspecs import hookimpl


@hookimpl
def register_objectives(register):
    from . import terms  # torch is imported only when objectives are asked for

    for spec in terms.BUILTIN_TERMS:
        register(spec)


@hookimpl
def register_guides(register):
    from .specs import GuideSpec

    register(GuideSpec(id="resnet50", builder="mimic_toolkit.resnet:resnet50", weights=None,
                       mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), input_size=224,
                       description="ResNet-50 (torchvision's layout), ImageNet normalisation at 224 px, the "
                                   "reference's guide; weights from --guide-weights"))


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
