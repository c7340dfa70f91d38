"""Qwen3-VL (Qwen/Qwen3-VL-8B-Instruct layout): a SigLIP-2-like ViT with 16 px patches, learned
position embeddings resampled to the image's grid, 2 x 2 patch merging and DeepStack (three
intermediate blocks' merged features added to the first LM layers' image tokens), on Qwen3-8B with
interleaved M-RoPE. This module is the plugin; the adapter class is imported lazily."""
from mimic_toolkit import AdapterSpec, hookimpl


@hookimpl
def register_adapters(register):
    register(AdapterSpec(
        id="qwen3-vl",
        aliases=("qwen3-vl-8b-instruct", "qwen/qwen3-vl-8b-instruct"),
        adapter="mimic_plugins.qwen3_vl.adapter:Qwen3VLAdapter",
        resolution=512,
        # The core's (LLaVA's) defaults with the jitter scaled from 336 to 512 px: not tuned on
        # Qwen3-VL. Any multiple of 32 px is accepted.
        defaults={"jitter": 46},
        untuned=True,
        description="Qwen3-VL-8B-Instruct: ViT with 2x2 merge and DeepStack, 256 image tokens at 512 px, ChatML",
        tested_transformers="5.24",
    ))
