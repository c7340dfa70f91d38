"""SmolVLM (HuggingFaceTB/SmolVLM-Instruct, Idefics3 layout) and SmolVLM2
(HuggingFaceTB/SmolVLM2-500M-Video-Instruct): a SigLIP tower, a pixel shuffle to few image tokens,
a SmolLM2 (Llama) decoder; image splitting off. This module is the plugin; the adapter classes are
imported lazily."""
from mimic_toolkit import AdapterSpec, hookimpl


@hookimpl
def register_adapters(register):
    # The core's (LLaVA's) defaults with the jitter scaled from 336 px to the model's side: not
    # tuned on SmolVLM. Only the tower's own side is accepted.
    register(AdapterSpec(
        id="smolvlm",
        aliases=("smolvlm-instruct", "huggingfacetb/smolvlm-instruct"),
        adapter="mimic_plugins.smolvlm.adapter:SmolVLMAdapter",
        resolution=378,  # the 27 x 27 patches of 14 px its tower reads of the processor's 384 px
        defaults={"jitter": 34},
        untuned=True,
        description="SmolVLM-Instruct (Idefics3): SigLIP at 384 px (378 read), 3x3 shuffle to 81 image tokens",
        tested_transformers="5.24",
    ))
    register(AdapterSpec(
        id="smolvlm2",
        aliases=("smolvlm2-500m-video-instruct", "huggingfacetb/smolvlm2-500m-video-instruct"),
        adapter="mimic_plugins.smolvlm.adapter:SmolVLM2Adapter",
        resolution=512,
        defaults={"jitter": 46},
        untuned=True,
        description="SmolVLM2-500M: SigLIP at 512 px, 4x4 pixel shuffle to 64 image tokens, SmolLM2",
        tested_transformers="5.24",
    ))
