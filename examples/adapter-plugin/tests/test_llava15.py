"""A plugin's own tests: the toolkit's contract suite on a tiny random model, and the chat format."""
from mimic_llava15.adapter import Llava15Adapter
from mimic_toolkit.testing import check_adapter


def test_llava15_passes_the_adapter_contract():
    check_adapter(Llava15Adapter.tiny())


def test_the_template_writes_llava_hf_format():
    adapter = Llava15Adapter.tiny()
    message = {"role": "user", "content": "<image>\nWhat is in the image?"}
    text = adapter.tokenizer.apply_chat_template([message], add_generation_prompt=True, tokenize=False,
                                                 chat_template=adapter.chat_template)
    assert text == adapter.tokenizer.bos_token + "USER: <image>\nWhat is in the image? ASSISTANT:"
