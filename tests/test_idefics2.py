"""The Idefics2 adapter: the processor's pixel layout, the prompt the forward
expects, the resolution it declares, and a short inversion."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from mimic_plugins.idefics2.adapter import Idefics2Adapter
from mimic_toolkit.config import resolve
from mimic_toolkit.errors import UserError
from mimic_toolkit.inversion import ActiveTerm, Inversion
from mimic_toolkit.terms import answer_ce

TURNS = [("What is in the image?", "a red circle")]


@pytest.fixture(scope="module")
def tiny_idefics2():
    return Idefics2Adapter.tiny()


def test_pixels_equal_the_image_processors_for_images_that_need_no_resizing(tiny_idefics2):
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil  # no torchvision

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (378, 378, 3), dtype=np.uint8)) for _ in range(2)]
    processor = Idefics2ImageProcessorPil(do_image_splitting=False, size={"shortest_edge": 378, "longest_edge": 980},
                                          image_mean=[0.5] * 3, image_std=[0.5] * 3)
    expected = processor(images=[[image] for image in images], return_tensors="pt")
    ours = tiny_idefics2.pixel_inputs(tiny_idefics2.preprocess(images, 378))
    assert ours["pixel_values"].shape == expected["pixel_values"].shape == (2, 1, 3, 378, 378)
    assert torch.allclose(ours["pixel_values"], expected["pixel_values"], atol=1e-5)
    assert torch.equal(ours["pixel_attention_mask"], expected["pixel_attention_mask"].bool())


def test_prompt_has_bos_the_image_between_boundaries_and_the_idefics2_turns(tiny_idefics2):
    prompt = tiny_idefics2.build_prompt([("What is in the image?", "a circle"), ("What colour is it?", "red")])
    tokens = tiny_idefics2.tokenizer.convert_ids_to_tokens(prompt.input_ids.tolist())
    first, last = int(prompt.image_positions[0]), int(prompt.image_positions[-1])
    assert tokens[:3] == ["<s>", "user", ":"] and tokens.count("<s>") == 1
    assert tokens[first - 1] == tokens[last + 1] == "<fake_token_around_image>"
    assert len(prompt.image_positions) == tiny_idefics2.model.config.perceiver_config.resampler_n_latents
    assert tokens[-4:] == ["<end_of_utterance>", "assistant", ":", "red"]
    text = tiny_idefics2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tokenize=False,
        add_generation_prompt=False, chat_template=tiny_idefics2.chat_template)
    assert text == "<s>User: a<end_of_utterance>\nAssistant: b<end_of_utterance>\n"


def test_the_prompt_holds_as_many_image_tokens_as_the_resampler_makes(tiny_idefics2):
    made = []
    connector = tiny_idefics2.model.model.connector
    handle = connector.register_forward_hook(lambda module, args, output: made.append(output.shape[:2]))
    prompt = tiny_idefics2.build_prompt(TURNS)
    try:
        logits = tiny_idefics2.target_logits(torch.randn(2, 3, 56, 56), prompt)
    finally:
        handle.remove()
    assert logits.shape[:2] == (2, prompt.n_target)
    assert made == [(2, len(prompt.image_positions))]


def test_default_resolution_is_378_and_sides_up_to_the_towers_size_are_accepted(tiny_idefics2):
    config = copy.deepcopy(tiny_idefics2.model.config)
    config.vision_config.image_size = 980  # the 8B checkpoint's tower
    from transformers import Idefics2ForConditionalGeneration

    adapter = Idefics2Adapter(Idefics2ForConditionalGeneration(config), tiny_idefics2.tokenizer)
    assert adapter.resolution == 378
    adapter.use_resolution(980)
    assert adapter.resolution == 980
    for side in (994, 380):
        with pytest.raises(UserError, match="multiples of 14 px up to 980"):
            adapter.use_resolution(side)


def test_a_short_inversion_lowers_the_answer_ce(tiny_idefics2):
    config = resolve([dict(iterations=15, batch_size=1, lr=0.1, jitter=0, flip=False, resolution=56, seed=0)])
    prompt = tiny_idefics2.build_prompt(TURNS)
    inversion = Inversion(tiny_idefics2, prompt, config, [ActiveTerm("main", answer_ce, 1.0)])
    first = inversion.run_step(want_metrics=True)["terms"]["main"]
    for _ in range(13):
        inversion.run_step()
    assert inversion.run_step(want_metrics=True)["terms"]["main"] < 0.8 * first


def test_a_saved_tiny_checkpoint_loads_back(tiny_idefics2, tmp_path):
    tiny_idefics2.save(tmp_path)
    loaded = Idefics2Adapter.load(str(tmp_path))
    prompt = tiny_idefics2.build_prompt(TURNS)
    assert torch.equal(loaded.build_prompt(TURNS).input_ids, prompt.input_ids)
    images = torch.randn(1, 3, 56, 56)
    assert torch.allclose(loaded.target_logits(images, prompt), tiny_idefics2.target_logits(images, prompt), atol=1e-5)
