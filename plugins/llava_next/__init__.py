"""LLaVA-NeXT (llava-hf/llama3-llava-next-8b-hf layout): CLIP ViT-L/14 at 336 px on AnyRes tiles
plus a base view, Llama-3-8B; and the Mistral-7B and Vicuna-7B checkpoints of the same layout,
whose chat formats this plugin gives through the prompt hook. This module is the plugin; the
adapter class is imported lazily."""
from mimic_toolkit import AdapterSpec, hookimpl

ADAPTER = "mimic_plugins.llava_next.adapter:LlavaNextAdapter"
# The LLaVA-Llama-3 defaults with the jitter scaled by resolution (30 px at 336): not tuned here.
DEFAULTS = {"jitter": 60}

# llava-hf's formats for string contents. Their tokenizers add the BOS, which the toolkit does not
# ask them to: the templates write it.
VARIANT_TEMPLATES = {
    # "[INST] <image>\nWhat is shown? [/INST] answer</s>"
    "llava-next-mistral-7b": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}<<SYS>>\n"
        "{{ message['content'] }}\n<</SYS>>\n\n{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} "
        "[/INST]{% else %} {{ message['content'] }}</s>{% endif %}{% endfor %}"),
    # "USER: <image>\nWhat is shown? ASSISTANT: answer USER: ..."
    "llava-next-vicuna-7b": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] != 'system' %}"
        "{{ message['role'] | upper }}: {% endif %}{{ message['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"),
}


@hookimpl
def register_adapters(register):
    register(AdapterSpec(
        id="llava-next",
        aliases=("llama3-llava-next-8b", "llava-hf/llama3-llava-next-8b-hf"),
        adapter=ADAPTER, resolution=672, defaults=DEFAULTS, untuned=True,
        description="LLaVA-NeXT-8B (Llama-3): CLIP-336 on 2x2 AnyRes tiles + base view, 2928 image tokens at 672 px",
        tested_transformers="5.24",
    ))
    for model_id, llm in (("llava-next-mistral-7b", "Mistral"), ("llava-next-vicuna-7b", "Vicuna")):
        register(AdapterSpec(
            id=model_id, aliases=(f"llava-hf/llava-v1.6-{llm.lower()}-7b-hf",), adapter=ADAPTER, resolution=672,
            defaults=DEFAULTS, untuned=True, tested_transformers="5.24",
            description=f"LLaVA-NeXT-7B ({llm}): LLaVA-NeXT's tiles, {llm} chat; random-weight benchmarks "
                        "use llava-next's architecture",
        ))


@hookimpl
def mimic_format_prompt(adapter, turns, target, image_turns):
    template = VARIANT_TEMPLATES.get(adapter.model_id)  # every other model keeps its own format
    if template is not None:
        return adapter.build_prompt(turns, target, chat_template=template, image_turns=image_turns)
