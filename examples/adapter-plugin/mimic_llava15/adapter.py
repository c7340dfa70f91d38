"""LLaVA-1.5-7B has the architecture of the built-in LLaVA-Llama-3 adapter (CLIP ViT-L/14-336,
MLP projector, a Llama decoder); only its chat format differs, so the adapter is a subclass that
declares the format. Loading, pixel inputs, feature sites and the tiny test model are inherited."""
from mimic_plugins.llava_llama3.adapter import LlavaLlama3Adapter


class Llava15Adapter(LlavaLlama3Adapter):
    # llava-hf's format: "USER: <image>\n{question} ASSISTANT: {answer} USER: ...". Its tokenizer adds
    # the BOS, which the toolkit does not ask it to: the template writes it.
    chat_template = (
        "{{ bos_token }}{% for message in messages %}{{ message['role'] | upper }}: {{ message['content'] }} "
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
