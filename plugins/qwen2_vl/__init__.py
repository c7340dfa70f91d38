"""Qwen2-VL (Qwen/Qwen2-VL-7B-Instruct layout): a ViT with 14 px patches and 2 x 2 patch merging,
on Qwen2-7B with M-RoPE. This module is the plugin; the adapter class is imported lazily."""
from mimic_toolkit import AdapterSpec, hookimpl


@hookimpl
def register_adapters(register):
    register(AdapterSpec(
        id="qwen2-vl",
        aliases=("qwen2-vl-7b-instruct", "qwen/qwen2-vl-7b-instruct"),
        adapter="mimic_plugins.qwen2_vl.adapter:Qwen2VLAdapter",
        resolution=448,
        # No defaults: the core's (the MIMIC reference code's, for LLaVA), not tuned for Qwen.
        # Any multiple of 28 px is accepted.
        description="Qwen2-VL-7B-Instruct: ViT with 2x2 merge, 256 image tokens at 448 px, ChatML",
        tested_transformers="5.17, 5.24",
    ))
