"""PaliGemma 2 (google/paligemma2-3b-pt-224 layout): SigLIP-so400m at 224 px, 256 image tokens,
Gemma-2-2B with prefix-LM attention. This module is the plugin; the adapter class is imported lazily."""
from mimic_toolkit import AdapterSpec, hookimpl


@hookimpl
def register_adapters(register):
    register(AdapterSpec(
        id="paligemma",
        aliases=("paligemma2-3b-pt-224", "google/paligemma2-3b-pt-224"),
        adapter="mimic_plugins.paligemma.adapter:PaliGemmaAdapter",
        resolution=224,
        # The LLaVA-Llama-3 defaults with the jitter scaled by resolution (30 px at 336): not tuned here.
        defaults={"jitter": 20},
        untuned=True,
        description="PaliGemma2-3B-pt-224: SigLIP-224, 256 image tokens, Gemma-2 with prefix-LM attention",
        tested_transformers="5.24",
    ))
