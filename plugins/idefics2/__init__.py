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
        # The reference's settings (method.md), not tuned for Idefics2; multiples of 14 px up to 980 are accepted.
        defaults={"iterations": 5000, "batch_size": 4, "lr": 0.3, "min_lr": 1e-5, "jitter": 30, "flip": True,
                  "scales": {"main": 0.005, "feature": 0.04, "patch": 5e-4, "tv_l1": 7e-4, "tv_l2": 4e-4,
                             "l2": 3e-4}},
        description="Idefics2-8B: SigLIP-so400m at 378 px, perceiver to 64 image tokens, Mistral chat",
        tested_transformers="5.17, 5.24",
    ))
