"""A plugin's own tests: the toolkit's contract suite on a tiny random model of the plugin's
model, and its chat format."""
from mimic_llava15 import MODEL_ID, VICUNA_TEMPLATE
from mimic_toolkit import format_prompt
from mimic_toolkit.testing import check_adapter, tiny_adapter


def test_llava15_passes_the_adapter_contract():
    check_adapter(tiny_adapter(MODEL_ID))


def test_the_template_writes_llava_hf_format():
    adapter = tiny_adapter(MODEL_ID)
    message = {"role": "user", "content": "<image>\nWhat is in the image?"}
    text = adapter.tokenizer.apply_chat_template([message], add_generation_prompt=True, tokenize=False,
                                                 chat_template=VICUNA_TEMPLATE)
    assert text == adapter.tokenizer.bos_token + "USER: <image>\nWhat is in the image? ASSISTANT:"


def test_prompts_of_this_model_use_the_vicuna_format():
    adapter = tiny_adapter(MODEL_ID)
    turns = [("What is in the image?", "a red circle")]
    vicuna = adapter.build_prompt(turns, chat_template=VICUNA_TEMPLATE)
    assert format_prompt(adapter, turns).input_ids.tolist() == vicuna.input_ids.tolist()
    assert vicuna.input_ids.tolist() != adapter.build_prompt(turns).input_ids.tolist()  # not Llama-3's
