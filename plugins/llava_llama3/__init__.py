"""LLaVA-Llama-3 (Intel/llava-llama-3-8b layout): CLIP ViT-L/14 at 336 px + Llama-3-8B.

This module is the plugin (what the entry point names); the adapter class is imported lazily.
"""
from mimic_toolkit import AdapterSpec, hookimpl


@hookimpl
def register_adapters(register):
    register(AdapterSpec(
        id="llava-llama3",
        aliases=("llava-llama-3-8b", "intel/llava-llama-3-8b"),
        adapter="mimic_plugins.llava_llama3.adapter:LlavaLlama3Adapter",
        resolution=336,
        # No defaults: the core's are the reference's reproduction settings for this model.
        description="LLaVA-Llama-3-8B (Intel layout): CLIP ViT-L/14-336, 576 image tokens, Llama-3 chat",
        tested_transformers="5.17, 5.24",
    ))
