"""InternVL3 in transformers' layout (OpenGVLab/InternVL3-8B-hf): InternViT-300M at 448 px, a 2 x 2
pixel shuffle to 256 image tokens, Qwen2.5-7B; tiling off. This module is the plugin; the adapter
class is imported lazily."""
from mimic_toolkit import AdapterSpec, hookimpl


@hookimpl
def register_adapters(register):
    register(AdapterSpec(
        id="internvl",
        aliases=("internvl3-8b-hf", "opengvlab/internvl3-8b-hf"),
        adapter="mimic_plugins.internvl.adapter:InternVLAdapter",
        resolution=448,
        # The core's (LLaVA's) defaults with the jitter scaled from 336 to 448 px: not tuned on
        # InternVL. Only the tower's own side is accepted.
        defaults={"jitter": 40},
        untuned=True,
        description="InternVL3-8B-hf: InternViT-300M at 448 px, 2x2 pixel shuffle to 256 image tokens, ChatML",
        tested_transformers="5.24",
    ))
