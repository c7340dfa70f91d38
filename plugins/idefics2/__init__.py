"""Idefics2 (HuggingFaceM4/idefics2-8b layout): SigLIP-so400m with 14 px patches, a perceiver
resampler to 64 tokens per image, Mistral-7B. This module is the plugin; the adapter class is
imported lazily."""
from mimic_toolkit import AdapterSpec, hookimpl


@hookimpl
def register_adapters(register):
    register(AdapterSpec(
        id="idefics2",
        aliases=("idefics2-8b", "huggingfacem4/idefics2-8b"),
        adapter="mimic_plugins.idefics2.adapter:Idefics2Adapter",
        resolution=378,
        # No defaults: the core's (the MIMIC reference code's, for LLaVA), not tuned for Idefics2.
        # Multiples of 14 px up to 980 are accepted.
        description="Idefics2-8B: SigLIP-so400m at 378 px, perceiver to 64 image tokens, Mistral chat",
        tested_transformers="5.17, 5.24",
    ))
