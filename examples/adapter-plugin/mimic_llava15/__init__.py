"""The plugin: registers LLaVA-1.5-7B. It imports neither torch nor transformers, so `mimic models`
stays fast; the adapter class is named by its import path and imported on first use."""
from mimic_toolkit import AdapterSpec, hookimpl


@hookimpl
def register_adapters(register):
    register(AdapterSpec(
        id="llava-1.5-7b",
        aliases=("llava-hf/llava-1.5-7b-hf",),
        adapter="mimic_llava15.adapter:Llava15Adapter",
        resolution=336,
        # The toolkit's defaults are the reference's settings; a model that needs others sets them here,
        # e.g. defaults={"lr": 0.1, "scales": {"feature": 0.02}}.
        description="LLaVA-1.5-7B (llava-hf layout): CLIP ViT-L/14-336, 576 image tokens, Vicuna chat",
        tested_transformers="5.17, 5.24",
    ))
