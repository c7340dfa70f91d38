"""Qwen2.5-VL (Qwen/Qwen2.5-VL-7B-Instruct layout): a ViT with 14 px patches, window attention in
most blocks and full attention in a few, 2 x 2 patch merging, on Qwen2.5-7B with M-RoPE. This
module is the plugin; the adapter class is imported lazily."""
from mimic_toolkit import AdapterSpec, hookimpl


@hookimpl
def register_adapters(register):
    register(AdapterSpec(
        id="qwen2.5-vl",
        aliases=("qwen2.5-vl-7b-instruct", "qwen/qwen2.5-vl-7b-instruct"),
        adapter="mimic_plugins.qwen2_5_vl.adapter:Qwen2_5_VLAdapter",
        resolution=448,
        # The core's (LLaVA's) defaults with the jitter scaled from 336 to 448 px: not tuned on
        # Qwen2.5-VL. Any multiple of 28 px is accepted.
        defaults={"jitter": 40},
        untuned=True,
        description="Qwen2.5-VL-7B-Instruct: windowed ViT with 2x2 merge, 256 image tokens at 448 px, ChatML",
        tested_transformers="5.24",
    ))
