"""LLaVA-NeXT (llava-hf/llama3-llava-next-8b-hf layout): CLIP ViT-L/14 at 336 px on AnyRes tiles
plus a base view, Llama-3-8B. This module is the plugin; the adapter class is imported lazily."""
from mimic_toolkit import AdapterSpec, hookimpl


@hookimpl
def register_adapters(register):
    register(AdapterSpec(
        id="llava-next",
        aliases=("llama3-llava-next-8b", "llava-hf/llama3-llava-next-8b-hf"),
        adapter="mimic_plugins.llava_next.adapter:LlavaNextAdapter",
        resolution=672,
        # The LLaVA-Llama-3 defaults with the jitter scaled by resolution (30 px at 336): not tuned here.
        defaults={"jitter": 60},
        untuned=True,
        description="LLaVA-NeXT-8B (Llama-3): CLIP-336 on 2x2 AnyRes tiles + base view, 2928 image tokens at 672 px",
        tested_transformers="5.24",
    ))
