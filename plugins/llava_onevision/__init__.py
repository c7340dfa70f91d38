"""LLaVA-OneVision (llava-hf/llava-onevision-qwen2-7b-ov-hf layout): SigLIP-so400m at 384 px on
AnyRes-max tiles plus a base view, Qwen2-7B. This module is the plugin; the adapter class is
imported lazily."""
from mimic_toolkit import AdapterSpec, hookimpl


@hookimpl
def register_adapters(register):
    register(AdapterSpec(
        id="llava-onevision",
        aliases=("llava-onevision-qwen2-7b-ov", "llava-hf/llava-onevision-qwen2-7b-ov-hf"),
        adapter="mimic_plugins.llava_onevision.adapter:LlavaOnevisionAdapter",
        resolution=768,
        # The LLaVA-Llama-3 defaults with the jitter scaled by resolution (30 px at 336), not tuned
        # here; no patch prior: SigLIP's 14 px patches do not tile its 384 px tiles.
        defaults={"jitter": 69, "scales": {"patch": 0.0}},
        untuned=True,
        description="LLaVA-OneVision-7B: SigLIP-384 on 2x2 AnyRes-max tiles + base view, 3699 image tokens at "
                    "768 px, ChatML",
        tested_transformers="5.24",
    ))
