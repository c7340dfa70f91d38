"""Gemma 3 (google/gemma-3-4b-it layout): SigLIP at 896 px pooled to 256 soft tokens, Gemma-3-4B.
This module is the plugin; the adapter class is imported lazily."""
from mimic_toolkit import AdapterSpec, hookimpl


@hookimpl
def register_adapters(register):
    register(AdapterSpec(
        id="gemma3",
        aliases=("gemma-3-4b-it", "google/gemma-3-4b-it"),
        adapter="mimic_plugins.gemma3.adapter:Gemma3Adapter",
        resolution=896,
        # The LLaVA-Llama-3 defaults with the jitter scaled by resolution (30 px at 336): not tuned here.
        defaults={"jitter": 80},
        untuned=True,
        description="Gemma-3-4B-it: SigLIP-896 pooled to 256 soft tokens between begin/end-of-image, pan-and-scan off",
        tested_transformers="5.24",
    ))
