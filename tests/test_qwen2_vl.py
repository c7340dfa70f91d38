"""The Qwen2-VL adapter: per-image statistics from the packed tower, the
processor's patch layout, the prompt the forward expects, and a short inversion."""
import numpy as np
import pytest
import torch
from PIL import Image

from mimic_plugins.qwen2_vl.adapter import Qwen2VLAdapter
from mimic_toolkit.config import resolve
from mimic_toolkit.errors import UserError
from mimic_toolkit.features import FeatureRecorder
from mimic_toolkit.inversion import ActiveTerm, Inversion
from mimic_toolkit.terms import answer_ce

TURNS = [("What is in the image?", "a red circle")]


@pytest.fixture(scope="module")
def tiny_qwen():
    return Qwen2VLAdapter.tiny()


def random_images(count, side, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def test_statistics_of_a_packed_batch_are_those_of_each_image_alone(tiny_qwen):
    images = tiny_qwen.preprocess(random_images(2, 56))

    def stats(batch):
        with torch.no_grad(), FeatureRecorder(tiny_qwen, batch.shape[0]) as recorder:
            tiny_qwen.vision_forward(batch)
        return recorder.stats

    together, first, second = stats(images), stats(images[:1]), stats(images[1:])
    for site, (mean, var) in together.items():
        assert not torch.allclose(mean[0], mean[1]), site
        assert torch.allclose(mean, torch.cat([first[site][0], second[site][0]]), atol=1e-5), site
        assert torch.allclose(var, torch.cat([first[site][1], second[site][1]]), atol=1e-5), site


def test_patches_equal_the_image_processors_for_images_that_need_no_resizing(tiny_qwen):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # no torchvision

    images = random_images(2, 448)
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280, patch_size=14,
                                         temporal_patch_size=2, merge_size=2)
    expected = processor(images=images, return_tensors="pt")
    ours = tiny_qwen.pixel_inputs(tiny_qwen.preprocess(images, 448))
    assert ours["pixel_values"].shape == expected["pixel_values"].shape == (2 * 32 * 32, 3 * 2 * 14 * 14)
    assert torch.allclose(ours["pixel_values"], expected["pixel_values"], atol=1e-5)
    assert torch.equal(ours["image_grid_thw"], expected["image_grid_thw"])


def test_prompt_is_chatml_with_the_image_wrapped_and_expanded(tiny_qwen):
    prompt = tiny_qwen.build_prompt(TURNS)
    tokens = tiny_qwen.tokenizer.convert_ids_to_tokens(prompt.input_ids.tolist())
    first, last = int(prompt.image_positions[0]), int(prompt.image_positions[-1])
    assert tokens[first - 1] == "<|vision_start|>" and tokens[last + 1] == "<|vision_end|>"
    assert len(prompt.image_positions) == (56 // 28) ** 2
    assert tokens[:3] == ["<|im_start|>", "system", "you"]  # Qwen's default system turn
    assert tokens[-6:] == ["<|im_end|>", "<|im_start|>", "assistant", "a", "red", "circle"]


def test_the_forward_takes_the_prompt_and_refuses_a_miscounted_one(tiny_qwen):
    prompt = tiny_qwen.build_prompt(TURNS)
    images = torch.randn(1, 3, 56, 56)
    assert tiny_qwen.target_logits(images, prompt).shape[:2] == (1, prompt.n_target)
    inputs = tiny_qwen.text_inputs(prompt, 1)
    inputs["input_ids"] = inputs["input_ids"].clone()
    inputs["input_ids"][0, prompt.image_positions[0]] = tiny_qwen.tokenizer.pad_token_id
    with pytest.raises(Exception, match="do not match"):
        tiny_qwen.model(**tiny_qwen.pixel_inputs(images), **inputs)


def test_resolution_is_any_multiple_of_28(tiny_qwen):
    adapter = Qwen2VLAdapter(tiny_qwen.model, tiny_qwen.tokenizer)
    assert adapter.resolution == 448
    adapter.use_resolution(84)
    assert adapter.resolution == 84 and adapter.image_token_count() == 9
    with pytest.raises(UserError, match="multiples of 28"):
        adapter.use_resolution(70)


def test_a_short_inversion_lowers_the_answer_ce(tiny_qwen):
    config = resolve([dict(iterations=15, batch_size=1, lr=0.1, jitter=0, flip=False, resolution=56, seed=0)])
    inversion = Inversion(tiny_qwen, tiny_qwen.build_prompt(TURNS), config, [ActiveTerm("main", answer_ce, 1.0)])
    first = inversion.run_step(want_metrics=True)["terms"]["main"]
    for _ in range(13):
        inversion.run_step()
    assert inversion.run_step(want_metrics=True)["terms"]["main"] < 0.7 * first


def test_a_saved_tiny_checkpoint_loads_back(tiny_qwen, tmp_path):
    tiny_qwen.save(tmp_path)
    loaded = Qwen2VLAdapter.load(str(tmp_path))
    loaded.use_resolution(56)
    assert torch.equal(loaded.build_prompt(TURNS).input_ids, tiny_qwen.build_prompt(TURNS).input_ids)
    images = torch.randn(1, 3, 56, 56)
    prompt = tiny_qwen.build_prompt(TURNS)
    assert torch.allclose(loaded.target_logits(images, prompt), tiny_qwen.target_logits(images, prompt), atol=1e-5)
