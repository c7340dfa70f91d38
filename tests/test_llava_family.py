"""The LLaVA-NeXT, LLaVA-OneVision, Gemma 3 and PaliGemma adapters against their transformers
processors (built from the tiny configs): the pixels the model gets for an image that needs no
resizing, the prompt's token layout, and each model's own attention over the image; the full
architectures' image-token counts against the processors' own counting."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from mimic_plugins.gemma3.adapter import Gemma3Adapter
from mimic_plugins.llava_next.adapter import LlavaNextAdapter
from mimic_plugins.llava_onevision.adapter import LlavaOnevisionAdapter
from mimic_plugins.paligemma.adapter import PaliGemmaAdapter
from mimic_toolkit.adapter import IMAGE_MARKER
from mimic_toolkit.errors import UserError

QUESTION, ANSWER = "What is in the image?", "a red circle"
TURNS = [(QUESTION, ANSWER)]


@pytest.fixture(scope="module")
def next_tiny():
    return LlavaNextAdapter.tiny()


@pytest.fixture(scope="module")
def onevision_tiny():
    return LlavaOnevisionAdapter.tiny()


@pytest.fixture(scope="module")
def gemma3_tiny():
    return Gemma3Adapter.tiny()


@pytest.fixture(scope="module")
def paligemma_tiny():
    return PaliGemmaAdapter.tiny()


def random_images(count, side, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


class ConfigOnly(torch.nn.Module):
    """A model of an architecture without its weights: what counting image tokens reads."""

    def __init__(self, config):
        super().__init__()
        self.config = config


def rendered(adapter, content):
    """The adapter's chat template over one user message, ready for generation."""
    return adapter.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True, chat_template=adapter.chat_template)


def assert_base_view_close(ours, expected, std):
    """The base view is downscaled: PIL filters 8-bit pixels in fixed point and rounds after each
    pass, the differentiable path filters floats. In grey levels: at most 1.5 apart, on average
    under 0.35 (measured on noise: at most 1.02, on average 0.29)."""
    levels = (ours - expected).abs() * torch.tensor(std).view(3, 1, 1) * 255
    assert levels.max() <= 1.5 and levels.mean() < 0.35, (levels.max(), levels.mean())


# -- LLaVA-NeXT ---------------------------------------------------------------------------------
def llava_next_processor(adapter, tokenizer=None):
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    config = adapter.model.config
    tile = config.vision_config.image_size
    images = LlavaNextImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                        image_grid_pinpoints=config.image_grid_pinpoints)
    # as llama3-llava-next-8b-hf's processor_config.json: CLIP's class token counted, then dropped
    return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer or adapter.tokenizer,
                              patch_size=config.vision_config.patch_size, num_additional_image_tokens=1,
                              vision_feature_select_strategy=config.vision_feature_select_strategy)


def test_llava_next_crops_are_the_processors_tiles_and_base_view(next_tiny):
    images = random_images(2, next_tiny.resolution)
    expected = llava_next_processor(next_tiny).image_processor(images=images, return_tensors="pt")
    ours = next_tiny.pixel_inputs(next_tiny.preprocess(images))
    assert ours["pixel_values"].shape == expected["pixel_values"].shape == (2, 1 + 2 * 2, 3, 32, 32)
    assert torch.allclose(ours["pixel_values"][:, 1:], expected["pixel_values"][:, 1:], atol=1e-5)  # tiles: exact
    assert_base_view_close(ours["pixel_values"][:, 0], expected["pixel_values"][:, 0], next_tiny.image_std)
    assert torch.equal(ours["image_sizes"], expected["image_sizes"])


def test_llava_next_crops_at_the_checkpoints_size(next_tiny):
    full = LlavaNextAdapter(ConfigOnly(LlavaNextAdapter.architecture("full")), next_tiny.tokenizer)
    images = random_images(1, 672)
    expected = llava_next_processor(full, next_tiny.tokenizer).image_processor(images=images, return_tensors="pt")
    ours = full.crops(next_tiny.preprocess(images, 672))  # the same normalisation
    assert ours.shape == expected["pixel_values"].shape == (1, 1 + 2 * 2, 3, 336, 336)
    assert torch.allclose(ours[:, 1:], expected["pixel_values"][:, 1:], atol=1e-5)
    assert_base_view_close(ours[:, 0], expected["pixel_values"][:, 0], full.image_std)


def test_llava_next_prompt_is_the_processors_expansion(next_tiny):
    processor = llava_next_processor(next_tiny)
    text = rendered(next_tiny, f"<image>\n{QUESTION}")
    expected = processor(images=random_images(1, next_tiny.resolution), text=text, return_tensors="pt")
    prompt = next_tiny.build_prompt(TURNS, target=False)
    assert prompt.input_ids.tolist() == expected["input_ids"][0].tolist()
    assert len(prompt.image_positions) == next_tiny.image_token_count() == 16 + 8 * 9


def test_llava_next_answers_the_processors_inputs_as_ours(next_tiny):
    """What is left of the base view's 8-bit rounding moves the answer by under 2 % of what another
    image does."""
    images, other = random_images(1, 64), random_images(1, 64, seed=5)
    expected = llava_next_processor(next_tiny)(images=images, text=rendered(next_tiny, f"<image>\n{QUESTION}"),
                                               return_tensors="pt")
    prompt = next_tiny.build_prompt(TURNS, target=False)
    with torch.no_grad():
        theirs = next_tiny.model(**expected).logits[0, -1]
        ours, elsewhere = (next_tiny.model(**next_tiny.pixel_inputs(next_tiny.preprocess(picture)),
                                           **next_tiny.text_inputs(prompt, 1)).logits[0, -1]
                           for picture in (images, other))
    assert (theirs - ours).abs().max() < 0.02 * (theirs - elsewhere).abs().max()


def test_llava_next_rows_of_tile_features_end_in_the_newline_after_the_base_view(next_tiny):
    seen = []
    language_model = next_tiny.model.model.language_model
    handle = language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"]), with_kwargs=True)
    prompt = next_tiny.build_prompt(TURNS)
    try:
        next_tiny.target_logits(torch.randn(1, 3, 64, 64), prompt)
    finally:
        handle.remove()
    image = seen[0][0, prompt.image_positions]
    is_newline = (image == next_tiny.model.model.image_newline).all(-1)
    rows, per_row = 8, 8 + 1  # 2 tiles x 4 patches a side
    expected = torch.zeros(16 + rows * per_row, dtype=torch.bool)
    expected[16 + per_row - 1::per_row] = True
    assert torch.equal(is_newline, expected)


def test_llava_next_statistics_of_a_batch_are_each_images_over_its_crops(next_tiny):
    from mimic_toolkit.features import FeatureRecorder

    images = next_tiny.preprocess(random_images(2, 64))

    def stats(batch):
        with torch.no_grad(), FeatureRecorder(next_tiny, batch.shape[0]) as recorder:
            next_tiny.vision_forward(batch)
        return recorder.stats

    together, first, second = stats(images), stats(images[:1]), stats(images[1:])
    for site, (mean, var) in together.items():
        assert torch.allclose(mean, torch.cat([first[site][0], second[site][0]]), atol=1e-5), site
        assert torch.allclose(var, torch.cat([first[site][1], second[site][1]]), atol=1e-5), site
    crops = next_tiny.crops(images[:1]).flatten(0, 1)  # one image's statistics: over all 5 of its crops
    with torch.no_grad():
        patches = next_tiny.patch_embedding(crops).flatten(2).transpose(1, 2).reshape(1, -1, 32)
    assert torch.allclose(first["vision.patch_embedding"][0], patches.mean(1), atol=1e-5)


def test_llava_next_a_short_inversion_lowers_the_answer_ce(next_tiny):
    from mimic_toolkit.config import resolve
    from mimic_toolkit.inversion import ActiveTerm, Inversion
    from mimic_toolkit.terms import answer_ce

    config = resolve([dict(iterations=15, batch_size=1, lr=0.1, jitter=0, flip=False, resolution=64, seed=0)])
    inversion = Inversion(next_tiny, next_tiny.build_prompt(TURNS), config, [ActiveTerm("main", answer_ce, 1.0)])
    first = inversion.run_step(want_metrics=True)["terms"]["main"]
    for _ in range(13):
        inversion.run_step()
    assert inversion.run_step(want_metrics=True)["terms"]["main"] < 0.7 * first


def test_llava_next_takes_the_square_grid_pinpoints(next_tiny):
    adapter = LlavaNextAdapter(next_tiny.model, next_tiny.tokenizer)
    assert adapter.resolution == 64 and adapter.square_sides() == [64]
    with pytest.raises(UserError, match=r"square AnyRes grids \[64\] px, not 32"):
        adapter.use_resolution(32)


def test_llava_next_mistral_and_vicuna_checkpoints_get_their_formats_through_the_prompt_hook():
    from mimic_plugins.llava_next import VARIANT_TEMPLATES
    from mimic_toolkit.engine import format_prompt
    from mimic_toolkit.testing import tiny_adapter

    llama3 = format_prompt(tiny_adapter("llava-next"), TURNS).input_ids.tolist()
    for model_id, template in VARIANT_TEMPLATES.items():
        adapter = tiny_adapter(model_id)
        assert type(adapter) is LlavaNextAdapter
        ids = format_prompt(adapter, TURNS).input_ids.tolist()
        assert ids == adapter.build_prompt(TURNS, chat_template=template).input_ids.tolist() != llama3
    mistral = tiny_adapter("llava-next-mistral-7b")
    text = mistral.tokenizer.apply_chat_template(
        [{"role": "user", "content": mistral.user_content(QUESTION, with_image=True)}], tokenize=False,
        add_generation_prompt=True, chat_template=VARIANT_TEMPLATES["llava-next-mistral-7b"])
    assert text == f"<|begin_of_text|>[INST] {IMAGE_MARKER}\n{QUESTION} [/INST]"


def test_llava_next_full_architecture_counts_as_the_checkpoints_processor(next_tiny):
    full = LlavaNextAdapter(ConfigOnly(LlavaNextAdapter.architecture("full")), next_tiny.tokenizer)
    processor = llava_next_processor(full, next_tiny.tokenizer)
    assert full.resolution == 672 and full.patch_size == 14
    expected = processor._get_num_multimodal_tokens(image_sizes=[[672, 672]]).num_image_tokens
    assert [full.image_token_count()] == expected == [576 + 48 * 49]


# -- LLaVA-OneVision ----------------------------------------------------------------------------
def onevision_processor(adapter):
    """LlavaOnevisionProcessor's own counting over its image processor. Its constructor wants a
    video processor, which needs torchvision: the counting methods need only these attributes."""
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    config = adapter.model.config
    tile = config.vision_config.image_size
    processor = object.__new__(LlavaOnevisionProcessor)
    processor.image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": tile, "width": tile}, image_grid_pinpoints=config.image_grid_pinpoints,
        image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.num_image_tokens = (tile // config.vision_config.patch_size) ** 2
    processor.vision_aspect_ratio = config.vision_aspect_ratio
    return processor


def test_onevision_crops_and_counts_are_the_processors_at_every_square_grid(onevision_tiny):
    adapter = LlavaOnevisionAdapter(onevision_tiny.model, onevision_tiny.tokenizer)
    processor = onevision_processor(adapter)
    assert adapter.square_sides() == [30, 60, 90, 120, 150, 180] and adapter.resolution == 60
    counts = []
    for side in adapter.square_sides():
        adapter.use_resolution(side)
        images = random_images(2, side, seed=side)
        expected = processor.image_processor(images=images, return_tensors="pt")
        ours = adapter.pixel_inputs(adapter.preprocess(images))
        assert ours["pixel_values"].shape == expected["pixel_values"].shape, side
        assert torch.allclose(ours["pixel_values"][:, 1:], expected["pixel_values"][:, 1:], atol=1e-5), side
        assert_base_view_close(ours["pixel_values"][:, 0], expected["pixel_values"][:, 0], adapter.image_std)
        assert torch.equal(ours["image_sizes"], expected["image_sizes"])
        counts.append(adapter.image_token_count())
        assert counts[-1] == processor._get_number_of_features(side, side, 30, 30), side
    # from 4 x 4 tiles on, AnyRes-max shrinks the tiles' map to about 9 tiles' worth
    assert counts == [9 + 3 * 4, 9 + 6 * 7, 9 + 9 * 10, 9 + 9 * 10, 9 + 8 * 9, 9 + 9 * 10]


def test_onevision_forward_takes_a_shrunk_tile_map(onevision_tiny):
    adapter = LlavaOnevisionAdapter(onevision_tiny.model, onevision_tiny.tokenizer)
    adapter.use_resolution(120)
    prompt = adapter.build_prompt(TURNS)
    logits = adapter.target_logits(torch.randn(2, 3, 120, 120), prompt)  # the model checks the token count
    assert logits.shape[:2] == (2, prompt.n_target)


def test_onevision_prompt_is_its_chatml(onevision_tiny):
    text = rendered(onevision_tiny, onevision_tiny.user_content(QUESTION, with_image=True))
    assert text == f"<|im_start|>user {IMAGE_MARKER}\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"


def test_onevision_full_architecture_counts_as_the_checkpoints_processor(onevision_tiny):
    full = LlavaOnevisionAdapter(ConfigOnly(LlavaOnevisionAdapter.architecture("full")), onevision_tiny.tokenizer)
    processor = onevision_processor(full)
    assert full.resolution == 768 and full.patch_size == 384
    for side in full.square_sides():
        full.use_resolution(side)
        assert full.image_token_count() == processor._get_number_of_features(side, side, 384, 384), side
    full.use_resolution(768)
    assert full.image_token_count() == 729 + 54 * 55


# -- Gemma 3 ------------------------------------------------------------------------------------
def gemma3_processor(adapter, tmp_path):
    from transformers import AutoTokenizer, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    adapter.tokenizer.save_pretrained(tmp_path)  # the checkpoint's tokenizer names its image tokens:
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    side = adapter.resolution
    images = Gemma3ImageProcessorPil(size={"height": side, "width": side}, do_pan_and_scan=False)
    return Gemma3Processor(image_processor=images, tokenizer=tokenizer,
                           image_seq_length=adapter.model.config.mm_tokens_per_image)


def test_gemma3_pixels_prompt_and_token_types_are_the_processors(gemma3_tiny, tmp_path):
    processor = gemma3_processor(gemma3_tiny, tmp_path)
    images = random_images(1, 64)
    expected = processor(images=images, text=rendered(gemma3_tiny, f"<start_of_image>{QUESTION}"),
                         return_tensors="pt")
    assert torch.allclose(gemma3_tiny.pixel_inputs(gemma3_tiny.preprocess(images))["pixel_values"],
                          expected["pixel_values"], atol=1e-5)
    prompt = gemma3_tiny.build_prompt(TURNS, target=False)
    assert prompt.input_ids.tolist() == expected["input_ids"][0].tolist()
    assert torch.equal(gemma3_tiny.text_inputs(prompt, 1)["token_type_ids"], expected["token_type_ids"])
    # the newlines too (the tiny tokenizer drops them): as the processor writes the image
    ours = rendered(gemma3_tiny, gemma3_tiny.user_content(QUESTION, with_image=True))
    soft_tokens = "<image_soft_token>" * gemma3_tiny.image_token_count()
    assert ours.replace(IMAGE_MARKER, soft_tokens) == rendered(gemma3_tiny, f"<start_of_image>{QUESTION}").replace(
        "<start_of_image>", processor.full_image_sequence)


def test_gemma3_soft_tokens_attend_both_ways_and_the_image_moves_the_answer(gemma3_tiny):
    prompt = gemma3_tiny.build_prompt(TURNS)
    images = torch.randn(2, 3, 64, 64)
    inputs = {**gemma3_tiny.pixel_inputs(images), **gemma3_tiny.text_inputs(prompt, 2)}
    with torch.no_grad():
        both_ways = gemma3_tiny.model(**inputs, output_hidden_states=True).hidden_states[1]
        causal = gemma3_tiny.model(**{**inputs, "token_type_ids": None}, output_hidden_states=True).hidden_states[1]
    first, last = int(prompt.image_positions[0]), int(prompt.image_positions[-1])
    assert not torch.allclose(both_ways[:, first], causal[:, first])  # the first soft token sees the later ones
    assert torch.allclose(both_ways[:, :first], causal[:, :first], atol=1e-6)  # nothing before the image does
    logits = gemma3_tiny.target_logits(images, prompt)
    assert (logits[0] - logits[1]).abs().max() > 1e-3


# -- PaliGemma ----------------------------------------------------------------------------------
def test_paligemma_pixels_prompt_and_prefix_are_the_processors(paligemma_tiny):
    from transformers import PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    images = SiglipImageProcessorPil(size={"height": 32, "width": 32}, resample=Image.BICUBIC)
    images.image_seq_length = paligemma_tiny.image_token_count()  # as its preprocessor_config.json says
    processor = PaliGemmaProcessor(image_processor=images, tokenizer=PaliGemmaAdapter.test_tokenizer())
    picture = random_images(1, 32)
    expected = processor(images=picture, text=f"<image>{QUESTION}", suffix=ANSWER, return_tensors="pt")
    assert torch.allclose(paligemma_tiny.pixel_inputs(paligemma_tiny.preprocess(picture))["pixel_values"],
                          expected["pixel_values"], atol=1e-5)
    prompt = paligemma_tiny.build_prompt(TURNS)
    inputs = paligemma_tiny.text_inputs(prompt, 1)
    # the processor's suffix ends in <eos>; the inversion's target does not
    assert prompt.input_ids.tolist() == expected["input_ids"][0, :-1].tolist()
    assert torch.equal(inputs["token_type_ids"], expected["token_type_ids"][:, :-1])
    _, layout, *_ = processor.prepare_inputs_layout(images=picture, text=[f"<image>{QUESTION}"])
    ours = paligemma_tiny.tokenizer.apply_chat_template(
        [{"role": "user", "content": paligemma_tiny.user_content(QUESTION, with_image=True)}], tokenize=False,
        add_generation_prompt=True, chat_template=paligemma_tiny.chat_template)
    assert ours.replace(IMAGE_MARKER, "<image>") == layout[0]  # "<image><bos>question\n", newline included


def test_paligemma_attention_is_prefix_lm(paligemma_tiny):
    prompt = paligemma_tiny.build_prompt(TURNS)
    images = torch.randn(1, 3, 32, 32)

    def first_layer(change_at):
        ids = prompt.input_ids.clone()
        if change_at is not None:
            ids[change_at] = paligemma_tiny.tokenizer.convert_tokens_to_ids("yes")
        inputs = {**paligemma_tiny.text_inputs(prompt, 1), "input_ids": ids[None]}
        with torch.no_grad():
            return paligemma_tiny.model(**paligemma_tiny.pixel_inputs(images), **inputs,
                                        output_hidden_states=True).hidden_states[1][0]

    plain, last_prompt_token, answer_token = first_layer(None), first_layer(-prompt.n_target - 1), first_layer(-1)
    assert not torch.allclose(plain[0], last_prompt_token[0])  # the image sees the whole prompt
    assert torch.allclose(plain[:-1], answer_token[:-1], atol=1e-6)  # but nothing sees the answer's future


def test_paligemma_refuses_a_system_prompt(paligemma_tiny):
    with pytest.raises(Exception, match="no system prompt"):
        paligemma_tiny.build_prompt(TURNS, system="Be brief.")


@pytest.mark.parametrize("fixture", ["gemma3_tiny", "paligemma_tiny"])
def test_token_types_hold_in_a_padded_batch_of_prompts(fixture, request):
    """Prompts of different lengths in one batch (in-context demonstrations) keep each model's own
    attention: every row gives the logits it gives alone."""
    tiny = request.getfixturevalue(fixture)
    prompts = [tiny.build_prompt(TURNS), tiny.build_prompt([("What shape is it?", "a square")])]
    images = torch.randn(2, 3, tiny.resolution, tiny.resolution)
    with torch.no_grad():
        together = tiny.model(**tiny.pixel_inputs(images), **tiny.padded_text_inputs(prompts)).logits
        for row, prompt in enumerate(prompts):
            alone = tiny.model(**tiny.pixel_inputs(images[row:row + 1]), **tiny.text_inputs(prompt, 1)).logits
            assert torch.allclose(together[row, :len(prompt.input_ids)], alone[0], atol=1e-5)


# -- all four: the public checkpoints' folders ---------------------------------------------------
def loads_from_a_hub_folder(adapter, folder, config_json, preprocessor_json):
    """The tiny model saved as the public checkpoint's folder is laid out: its config.json fields
    (`config_json`, the tiny's sizes), the processor's files, and the weights under the hub's names
    (they predate transformers 5's module layout: transformers 5 writes them so but for the
    vision tower's `vision_model.`, and reads them all). Loaded through the adapter, it gives the
    tiny's logits."""
    from safetensors.torch import load_file, save_file

    adapter.save(folder)
    weights = load_file(folder / "model.safetensors")
    assert any(name.startswith("language_model.model.layers.0.") for name in weights)
    hub_names = {re.sub(r"^vision_tower\.", "vision_tower.vision_model.", name): tensor
                 for name, tensor in weights.items()}
    save_file(hub_names, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config_json))
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_json))
    loaded = type(adapter).load(str(folder))
    prompt = adapter.build_prompt(TURNS)
    assert torch.equal(loaded.build_prompt(TURNS).input_ids, prompt.input_ids)
    images = torch.randn(1, 3, adapter.resolution, adapter.resolution)
    assert torch.allclose(loaded.target_logits(images, prompt), adapter.target_logits(images, prompt), atol=1e-5)


def sizes(config, *names):
    return {name: getattr(config, name) for name in names}


LAYERS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def test_llava_next_loads_from_the_hub_layout(next_tiny, tmp_path):
    """llava-hf/llama3-llava-next-8b-hf's config.json: image_token_index, rope_theta in text_config."""
    config = next_tiny.model.config
    text, vision = config.text_config, config.vision_config
    hub = {"architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next", "ignore_index": -100,
           "image_grid_pinpoints": config.image_grid_pinpoints, "image_token_index": config.image_token_id,
           "projector_hidden_act": "gelu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "transformers_version": "4.45.2", "use_image_newline_parameter": True, "vision_feature_layer": -2,
           "vision_feature_select_strategy": "default", "vocab_size": text.vocab_size, "use_cache": False,
           "text_config": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
                           "rope_theta": text.rope_parameters["rope_theta"],
                           **sizes(text, *LAYERS, "num_key_value_heads", "vocab_size", "max_position_embeddings",
                                   "pad_token_id", "rms_norm_eps")},
           "vision_config": {"model_type": "clip_vision_model", **sizes(vision, *LAYERS, "image_size", "patch_size",
                                                                        "projection_dim")}}
    preprocessor = {"image_processor_type": "LlavaNextImageProcessor", "processor_class": "LlavaNextProcessor",
                    "image_grid_pinpoints": config.image_grid_pinpoints, "size": {"shortest_edge": 32},
                    "crop_size": {"height": 32, "width": 32}, "resample": 3, "image_mean": list(next_tiny.image_mean),
                    "image_std": list(next_tiny.image_std)}
    loads_from_a_hub_folder(next_tiny, tmp_path, hub, preprocessor)


def test_onevision_loads_from_the_hub_layout(onevision_tiny, tmp_path):
    """llava-hf/llava-onevision-qwen2-7b-ov-hf's config.json."""
    config = onevision_tiny.model.config
    text, vision = config.text_config, config.vision_config
    hub = {"architectures": ["LlavaOnevisionForConditionalGeneration"], "model_type": "llava_onevision",
           "image_grid_pinpoints": config.image_grid_pinpoints, "image_token_index": config.image_token_id,
           "video_token_index": config.video_token_id, "projector_hidden_act": "gelu", "tie_word_embeddings": False,
           "torch_dtype": "float16", "use_image_newline_parameter": True, "vision_aspect_ratio": "anyres_max_9",
           "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
           "text_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_theta": 1000000.0,
                           "max_window_layers": text.num_hidden_layers, "sliding_window": 131072,
                           "use_sliding_window": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                           **sizes(text, *LAYERS, "num_key_value_heads", "vocab_size", "max_position_embeddings",
                                   "pad_token_id", "eos_token_id", "rms_norm_eps")},
           "vision_config": {"model_type": "siglip_vision_model", "vision_use_head": False,
                             **sizes(vision, *LAYERS, "image_size", "patch_size")}}
    preprocessor = {"image_processor_type": "LlavaOnevisionImageProcessor", "do_pad": True, "resample": 3,
                    "image_grid_pinpoints": config.image_grid_pinpoints, "size": {"height": 30, "width": 30},
                    "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "processor_class": "LlavaOnevisionProcessor"}
    loads_from_a_hub_folder(onevision_tiny, tmp_path, hub, preprocessor)


def test_gemma3_loads_from_the_hub_layout(gemma3_tiny, tmp_path):
    """google/gemma-3-4b-it's config.json: the *_index names, rope_scaling of the global layers."""
    config = gemma3_tiny.model.config
    text, vision = config.text_config, config.vision_config
    hub = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
           "boi_token_index": config.boi_token_id, "eoi_token_index": config.eoi_token_id,
           "image_token_index": config.image_token_id, "eos_token_id": [text.eos_token_id], "initializer_range": 0.02,
           "mm_tokens_per_image": config.mm_tokens_per_image, "torch_dtype": "bfloat16",
           "transformers_version": "4.50.0.dev0",
           "text_config": {"model_type": "gemma3_text", "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "layer_types": text.layer_types,
                           **sizes(text, *LAYERS, "num_key_value_heads", "head_dim", "query_pre_attn_scalar",
                                   "sliding_window", "vocab_size", "max_position_embeddings", "pad_token_id",
                                   "bos_token_id", "eos_token_id")},
           "vision_config": {"model_type": "siglip_vision_model", "vision_use_head": False,
                             **sizes(vision, *LAYERS, "image_size", "patch_size")}}
    preprocessor = {"image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
                    "do_pan_and_scan": None, "image_seq_length": config.mm_tokens_per_image, "resample": 2,
                    "size": {"height": 64, "width": 64}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    loads_from_a_hub_folder(gemma3_tiny, tmp_path, hub, preprocessor)


def test_paligemma_loads_from_the_hub_layout(paligemma_tiny, tmp_path):
    """google/paligemma2-3b-pt-224's config.json, with its stale top-level hidden_size."""
    config = paligemma_tiny.model.config
    text, vision = config.text_config, config.vision_config
    hub = {"architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
           "bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id, "pad_token_id": text.pad_token_id,
           "hidden_size": 2048, "image_token_index": config.image_token_id, "projection_dim": config.projection_dim,
           "torch_dtype": "bfloat16", "transformers_version": "4.47.0.dev0",
           "text_config": {"model_type": "gemma2", "hidden_activation": "gelu_pytorch_tanh",
                           "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
                           "num_image_tokens": paligemma_tiny.image_token_count(),
                           **sizes(text, *LAYERS, "num_key_value_heads", "head_dim", "query_pre_attn_scalar",
                                   "sliding_window", "vocab_size")},
           "vision_config": {"model_type": "siglip_vision_model", "vision_use_head": False,
                             "projection_dim": config.projection_dim,
                             **sizes(vision, *LAYERS, "image_size", "patch_size")}}
    preprocessor = {"image_processor_type": "SiglipImageProcessor", "processor_class": "PaliGemmaProcessor",
                    "image_seq_length": paligemma_tiny.image_token_count(), "resample": 3,
                    "size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    loads_from_a_hub_folder(paligemma_tiny, tmp_path, hub, preprocessor)


# -- all four -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["next_tiny", "onevision_tiny", "gemma3_tiny", "paligemma_tiny"])
def test_a_saved_tiny_checkpoint_loads_back(fixture, request, tmp_path):
    tiny = request.getfixturevalue(fixture)
    tiny.save(tmp_path)
    loaded = type(tiny).load(str(tmp_path))
    prompt = tiny.build_prompt(TURNS)
    assert torch.equal(loaded.build_prompt(TURNS).input_ids, prompt.input_ids)
    images = torch.randn(1, 3, tiny.resolution, tiny.resolution)
    assert torch.allclose(loaded.target_logits(images, prompt), tiny.target_logits(images, prompt), atol=1e-5)


def test_the_four_are_registered_with_untuned_defaults_scaled_by_their_side():
    from mimic_toolkit.registry import build_registry

    specs = build_registry().adapter_specs()
    for model_id, side, jitter in (("llava-next", 672, 60), ("llava-next-mistral-7b", 672, 60),
                                   ("llava-next-vicuna-7b", 672, 60), ("llava-onevision", 768, 69),
                                   ("gemma3", 896, 80), ("paligemma", 224, 20)):
        spec = specs[model_id]
        assert spec.untuned and spec.tested_transformers == "5.24" and spec.resolution == side
        assert spec.defaults["jitter"] == jitter == round(30 * side / 336)
    assert specs["llava-onevision"].defaults["scales"] == {"patch": 0.0}


def test_token_grids(next_tiny, gemma3_tiny, paligemma_tiny):
    assert gemma3_tiny.image_token_grid() == (2, 2, 0)  # 8 x 8 patches pooled 4 x 4
    assert paligemma_tiny.image_token_grid() == (4, 4, 0)  # one token per patch
    assert next_tiny.image_token_grid() is None  # the base view, then the tiles' rows with their newlines


@pytest.mark.parametrize("fixture", ["next_tiny", "onevision_tiny", "gemma3_tiny", "paligemma_tiny"])
def test_recomputation_leaves_the_gradient_unchanged(fixture, request):
    tiny = request.getfixturevalue(fixture)
    prompt = tiny.build_prompt(TURNS)
    images = torch.randn(2, 3, tiny.resolution, tiny.resolution)

    def gradient(level):
        pixels = images.clone().requires_grad_(True)
        with tiny.activation_checkpointing(level):
            tiny.target_logits(pixels, prompt).logsumexp(-1).mean().backward()
        return pixels.grad

    plain = gradient("off")
    assert plain.abs().sum() > 0
    for level in ("selective", "layers"):
        assert torch.allclose(gradient(level), plain, atol=1e-6), level
