"""The plugin: LLaVA-1.5-7B. Its architecture is the built-in LLaVA adapter's (CLIP ViT-L/14-336,
MLP projector, a Llama decoder); only the chat format differs, so the plugin is data: a model
record naming that adapter, and the Vicuna template given through the prompt-formatting hook.
It imports neither torch nor transformers, so `mimic models` stays fast."""
from mimic_toolkit import AdapterSpec, hookimpl

MODEL_ID = "llava-1.5-7b"

# llava-hf's format: "USER: <image>\n{question} ASSISTANT: {answer} USER: ...". Its tokenizer adds the
# BOS, which the toolkit does not ask it to: the template writes it.
VICUNA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | upper }}: {{ message['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@hookimpl
def register_adapters(register):
    register(AdapterSpec(
        id=MODEL_ID,
        aliases=("llava-hf/llava-1.5-7b-hf",),
        adapter="mimic_plugins.llava_llama3.adapter:LlavaLlama3Adapter",
        resolution=336,
        # The toolkit's defaults are the reference's settings; a model that needs others sets them here,
        # e.g. defaults={"lr": 0.1, "scales": {"feature": 0.02}}.
        description="LLaVA-1.5-7B (llava-hf layout): CLIP ViT-L/14-336, 576 image tokens, Vicuna chat",
        tested_transformers="5.17, 5.24",
    ))


@hookimpl
def mimic_format_prompt(adapter, turns, target, image_turns):
    if adapter.model_id == MODEL_ID:  # every other model keeps its own format
        return adapter.build_prompt(turns, target, chat_template=VICUNA_TEMPLATE, image_turns=image_turns)
