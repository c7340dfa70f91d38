"""The Qwen2.5-VL, Qwen3-VL, SmolVLM (Idefics3 layout) and InternVL adapters: the differentiable
image path against the real image processors, the prompt against the real processors' image-token
expansion, per-image statistics of the packed (and windowed) towers, DeepStack, the sides each model
takes, and each public checkpoint's config.json layout loading into the adapter."""
import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mimic_plugins.internvl.adapter import IMAGENET_MEAN, IMAGENET_STD, InternVLAdapter
from mimic_plugins.qwen2_5_vl.adapter import Qwen2_5_VLAdapter
from mimic_plugins.qwen2_vl.adapter import CLIP_MEAN, CLIP_STD
from mimic_plugins.qwen3_vl.adapter import Qwen3VLAdapter
from mimic_plugins.smolvlm.adapter import SmolVLM2Adapter, SmolVLMAdapter
from mimic_toolkit.config import resolve
from mimic_toolkit.errors import UserError
from mimic_toolkit.features import FeatureRecorder
from mimic_toolkit.inversion import ActiveTerm, Inversion
from mimic_toolkit.terms import answer_ce

TURNS = [("What is in the image?", "a red circle")]


@pytest.fixture(scope="module")
def qwen2_5():
    return Qwen2_5_VLAdapter.tiny()


@pytest.fixture(scope="module")
def qwen3():
    return Qwen3VLAdapter.tiny()


@pytest.fixture(scope="module")
def smolvlm():
    return SmolVLMAdapter.tiny()


@pytest.fixture(scope="module")
def internvl():
    return InternVLAdapter.tiny()


def random_images(count, side, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def qwen_image_processor(patch_size, mean, std, min_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # no torchvision

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=16384 * 1024, patch_size=patch_size,
                                    temporal_patch_size=2, merge_size=2, image_mean=list(mean), image_std=list(std))


def expanded_prompt_ids(adapter, image_text, user_text="What is in the image?"):
    """The token ids of the one-turn prompt with the processor's image text in place of the image."""
    content = adapter.user_content(user_text, with_image=True).replace(
        adapter.user_content("", with_image=True), image_text)
    text = adapter.tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                 tokenize=False, chat_template=adapter.chat_template)
    return adapter.tokenizer(text, add_special_tokens=False).input_ids


def logits_after_reload(adapter, folder, config_json):
    """Save the tiny model, replace its config.json by `config_json` (a public checkpoint's layout),
    load it back through the adapter: the logits of the original and the loaded model."""
    adapter.save(folder)
    (folder / "config.json").write_text(json.dumps(config_json))
    loaded = type(adapter).load(str(folder))
    loaded.use_resolution(adapter.resolution)
    prompt = adapter.build_prompt(TURNS)
    assert torch.equal(loaded.build_prompt(TURNS).input_ids, prompt.input_ids)
    images = torch.randn(1, 3, adapter.resolution, adapter.resolution)
    return adapter.target_logits(images, prompt), loaded.target_logits(images, prompt)


def tiny_text_fields(text_config, *names):
    return {name: getattr(text_config, name) for name in names}



@pytest.mark.parametrize("name", ["qwen2_5", "qwen3", "smolvlm", "internvl"])
def test_a_short_inversion_lowers_the_answer_ce_the_same_with_recomputation(name, request):
    adapter = request.getfixturevalue(name)
    prompt = adapter.build_prompt(TURNS)
    curves = []
    for memory_saving in ("off", "selective"):
        config = resolve([dict(iterations=8, batch_size=2, lr=0.1, jitter=0, flip=False, seed=0,
                               resolution=adapter.resolution, memory_saving=memory_saving)])
        with Inversion(adapter, prompt, config, [ActiveTerm("main", answer_ce, 1.0)]) as inversion:
            curves.append([inversion.run_step(want_metrics=True)["terms"]["main"] for _ in range(8)])
    assert curves[1] == pytest.approx(curves[0], rel=1e-4)
    assert curves[0][-1] < 0.7 * curves[0][0]

# -- Qwen2.5-VL ----------------------------------------------------------------------------------
def test_qwen2_5_vl_block_outputs_come_back_in_the_processors_token_order(qwen2_5):
    """The merger packs 4 consecutive tokens into one LM token: fed a block's tokens in the order
    `site_tokens` gives, it reproduces the tower's output (which transformers puts back in the
    processor's order); fed them in the tower's window order, it does not."""
    order = qwen2_5.unwindowing(2, 84 // 14, torch.device("cpu"))
    assert not torch.equal(order, torch.arange(len(order)))  # the tiny's windows do reorder the tokens
    inputs = qwen2_5.pixel_inputs(qwen2_5.preprocess(random_images(2, 84), 84))
    captured = []
    handle = qwen2_5.visual.blocks[-1].register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with torch.no_grad():
            tower = qwen2_5.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    finally:
        handle.remove()
    tokens = qwen2_5.site_tokens("vision.layers.1", captured[0], 2)
    assert tokens.shape == (2, 36, 32)
    with torch.no_grad():
        merger = qwen2_5.visual.merger
        assert torch.allclose(merger(tokens.reshape(-1, 32)), tower, atol=1e-5)
        assert not torch.allclose(merger(captured[0]), tower, atol=1e-3)


def test_qwen2_5_vl_statistics_of_a_packed_batch_are_those_of_each_image_alone(qwen2_5):
    images = qwen2_5.preprocess(random_images(2, 84))

    def stats(batch):
        with torch.no_grad(), FeatureRecorder(qwen2_5, batch.shape[0], qwen2_5.vision_sites()) as recorder:
            qwen2_5.vision_forward(batch)
        return recorder.stats

    together, first, second = stats(images), stats(images[:1]), stats(images[1:])
    assert len(together) == 7  # the patch embedding and both blocks (a windowed and a full one), in parts
    for site, (mean, var) in together.items():
        assert not torch.allclose(mean[0], mean[1]), site
        assert torch.allclose(mean, torch.cat([first[site][0], second[site][0]]), atol=1e-5), site
        assert torch.allclose(var, torch.cat([first[site][1], second[site][1]]), atol=1e-5), site


def test_qwen2_5_vl_pixels_and_prompt_are_the_processors(qwen2_5):
    from transformers import Qwen2_5_VLProcessor

    images = random_images(2, 84)
    expected = qwen_image_processor(14, CLIP_MEAN, CLIP_STD, 56 * 56)(images=images, return_tensors="pt")
    ours = qwen2_5.pixel_inputs(qwen2_5.preprocess(images, 84))
    assert ours["pixel_values"].shape == expected["pixel_values"].shape == (2 * 6 * 6, 3 * 2 * 14 * 14)
    assert torch.allclose(ours["pixel_values"], expected["pixel_values"], atol=1e-5)
    assert torch.equal(ours["image_grid_thw"], expected["image_grid_thw"])
    # the processor's own expansion of <|image_pad|> for this image (its constructor wants a video processor)
    processor = SimpleNamespace(image_processor=SimpleNamespace(merge_size=2), image_token="<|image_pad|>")
    image_text = Qwen2_5_VLProcessor.replace_image_token(processor, expected, 0)
    prompt = qwen2_5.build_prompt(TURNS, target=False)
    assert prompt.input_ids.tolist() == expanded_prompt_ids(
        qwen2_5, f"<|vision_start|>{image_text}<|vision_end|>")
    tokens = qwen2_5.tokenizer.convert_ids_to_tokens(prompt.input_ids.tolist())
    assert tokens[:3] == ["<|im_start|>", "system", "you"] and len(prompt.image_positions) == 9


def test_qwen2_5_vl_the_public_config_layout_loads(qwen2_5, tmp_path):
    """Qwen/Qwen2.5-VL-7B-Instruct's config.json: text fields at the top, `rope_scaling` of type
    mrope, the vision tower's own field names; the tiny's sizes."""
    config = qwen2_5.model.config
    vision, text = config.vision_config, config.text_config
    hub = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
           "vision_start_token_id": config.vision_start_token_id, "vision_end_token_id": config.vision_end_token_id,
           "image_token_id": config.image_token_id, "video_token_id": config.video_token_id, "hidden_act": "silu",
           **tiny_text_fields(text, "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                              "pad_token_id", "eos_token_id", "initializer_range"),
           "bos_token_id": None, "max_window_layers": text.num_hidden_layers, "rope_theta": 1000000.0,
           "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": False,
           "torch_dtype": "float32", "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
           "vision_config": {"depth": vision.depth, "hidden_act": "silu", "hidden_size": vision.hidden_size,
                             "intermediate_size": vision.intermediate_size, "num_heads": vision.num_heads,
                             "in_chans": 3, "out_hidden_size": vision.out_hidden_size, "patch_size": 14,
                             "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": vision.window_size,
                             "fullatt_block_indexes": list(vision.fullatt_block_indexes), "tokens_per_second": 2,
                             "temporal_patch_size": 2}}
    original, loaded = logits_after_reload(qwen2_5, tmp_path, hub)
    assert torch.allclose(original, loaded, atol=1e-5)


def test_qwen2_5_vl_and_qwen3_vl_take_multiples_of_their_merged_patch(qwen2_5, qwen3):
    for adapter, side, name in ((qwen2_5, 28, "Qwen2.5-VL"), (qwen3, 32, "Qwen3-VL")):
        fresh = type(adapter)(adapter.model, adapter.tokenizer)
        fresh.use_resolution(3 * side)
        assert fresh.image_token_count() == 9
        with pytest.raises(UserError, match=f"{name} takes sides that are multiples of {side} px"):
            fresh.use_resolution(side + 2)
    assert Qwen3VLAdapter(qwen3.model, qwen3.tokenizer).resolution == 512  # 256 image tokens, as Qwen2-VL's 448


# -- Qwen3-VL ------------------------------------------------------------------------------------
def test_qwen3_vl_deepstack_features_reach_the_answer(qwen3):
    """Block 0's merged features are added to the image tokens after LM layer 0: silencing their
    merger changes the answer's logits, and it runs once per forward on every image's tokens."""
    prompt = qwen3.build_prompt(TURNS)
    images = torch.randn(2, 3, 64, 64)
    assert qwen3.model.config.vision_config.deepstack_visual_indexes == [0]
    seen = []

    def silence(module, args, output):
        seen.append(output.shape)
        return torch.zeros_like(output)

    with torch.no_grad():
        full = qwen3.target_logits(images, prompt)
        handle = qwen3.visual.deepstack_merger_list[0].register_forward_hook(silence)
        try:
            without = qwen3.target_logits(images, prompt)
        finally:
            handle.remove()
    assert seen == [(2 * len(prompt.image_positions), qwen3.hidden_size)]
    assert not torch.allclose(full, without, atol=1e-4)


def test_qwen3_vl_pixels_and_prompt_are_the_processors(qwen3):
    from transformers import Qwen3VLProcessor

    images = random_images(2, 256)  # the checkpoint's processor keeps at least 65536 pixels: 256 x 256
    expected = qwen_image_processor(16, (0.5,) * 3, (0.5,) * 3, 65536)(images=images, return_tensors="pt")
    ours = qwen3.pixel_inputs(qwen3.preprocess(images, 256))
    assert ours["pixel_values"].shape == expected["pixel_values"].shape == (2 * 16 * 16, 3 * 2 * 16 * 16)
    assert torch.allclose(ours["pixel_values"], expected["pixel_values"], atol=1e-5)
    assert torch.equal(ours["image_grid_thw"], expected["image_grid_thw"])
    small = qwen_image_processor(16, (0.5,) * 3, (0.5,) * 3, 64 * 64)(images=random_images(1, 64), return_tensors="pt")
    processor = SimpleNamespace(image_processor=SimpleNamespace(merge_size=2), image_token="<|image_pad|>")
    image_text = Qwen3VLProcessor.replace_image_token(processor, small, 0)
    prompt = qwen3.build_prompt(TURNS, target=False)
    assert prompt.input_ids.tolist() == expanded_prompt_ids(qwen3, f"<|vision_start|>{image_text}<|vision_end|>")
    tokens = qwen3.tokenizer.convert_ids_to_tokens(prompt.input_ids.tolist())
    assert tokens[:2] == ["<|im_start|>", "user"]  # no default system turn, unlike Qwen2-VL


def test_qwen3_vl_the_public_config_layout_loads(qwen3, tmp_path):
    """Qwen/Qwen3-VL-8B-Instruct's config.json: nested configs, the text's `rope_scaling` with
    interleaved M-RoPE and `rope_theta` beside it; the tiny's sizes."""
    config = qwen3.model.config
    vision, text = config.vision_config, config.text_config
    text_json = {**tiny_text_fields(text, "hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                                    "max_position_embeddings", "rms_norm_eps", "pad_token_id", "eos_token_id",
                                    "initializer_range"),
                 "model_type": "qwen3_vl_text", "bos_token_id": None, "hidden_act": "silu", "rope_theta": 5000000,
                 "rope_scaling": {"mrope_interleaved": True, "mrope_section": [2, 3, 3], "rope_type": "default"},
                 "tie_word_embeddings": False, "attention_bias": False}
    vision_json = {"model_type": "qwen3_vl", "deepstack_visual_indexes": [0], "depth": vision.depth,
                   "hidden_act": "gelu_pytorch_tanh", "hidden_size": vision.hidden_size, "in_channels": 3,
                   "intermediate_size": vision.intermediate_size, "num_heads": vision.num_heads,
                   "num_position_embeddings": vision.num_position_embeddings,
                   "out_hidden_size": vision.out_hidden_size, "patch_size": 16, "spatial_merge_size": 2,
                   "temporal_patch_size": 2}
    hub = {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
           "image_token_id": config.image_token_id, "video_token_id": config.video_token_id,
           "vision_start_token_id": config.vision_start_token_id, "vision_end_token_id": config.vision_end_token_id,
           "tie_word_embeddings": False, "text_config": text_json, "vision_config": vision_json}
    original, loaded = logits_after_reload(qwen3, tmp_path, hub)
    assert torch.allclose(original, loaded, atol=1e-5)


# -- SmolVLM (Idefics3 layout) -------------------------------------------------------------------
def smolvlm_image_processor(side):
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    return Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": side},
                                     max_image_size={"longest_edge": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def test_smolvlm_pixels_are_the_processors_as_its_tower_reads_them(smolvlm):
    """At SmolVLM-Instruct's 384 px the patches read the top-left 378 px of the processor's image:
    ours are those pixels; and on the tiny (60 px, 56 read) the model's answer to the processor's
    whole image is its answer to ours."""
    from transformers import Idefics3ForConditionalGeneration

    config = copy.deepcopy(smolvlm.model.config)
    config.vision_config.image_size, config.scale_factor = 384, 3  # the public checkpoint's, at the tiny's width
    adapter = SmolVLMAdapter(Idefics3ForConditionalGeneration(config), smolvlm.tokenizer)
    assert adapter.resolution == 378 and adapter.image_token_count() == 81
    images = random_images(2, 384)
    expected = smolvlm_image_processor(384)(images=[[image] for image in images], return_tensors="pt")
    ours = adapter.pixel_inputs(adapter.preprocess(images))
    assert ours["pixel_values"].shape == (2, 1, 3, 378, 378) and expected["pixel_values"].shape[-1] == 384
    assert torch.allclose(ours["pixel_values"], expected["pixel_values"][..., :378, :378], atol=1e-5)

    images = random_images(2, 60)
    expected = smolvlm_image_processor(60)(images=[[image] for image in images], return_tensors="pt")
    prompt = smolvlm.build_prompt(TURNS)
    text = smolvlm.teacher_forcing_inputs(prompt, 2)
    with torch.no_grad():
        theirs = smolvlm.model(pixel_values=expected["pixel_values"],
                               pixel_attention_mask=expected["pixel_attention_mask"].bool(), **text).logits
    assert torch.allclose(smolvlm.target_logits(smolvlm.preprocess(images), prompt),
                          theirs[:, -prompt.n_target - 1:-1].float(), atol=1e-4)


def test_smolvlm_prompt_is_the_processors(smolvlm):
    from transformers import Idefics3Processor

    processor = Idefics3Processor(image_processor=smolvlm_image_processor(60), tokenizer=smolvlm.tokenizer,
                                  image_seq_len=smolvlm.image_token_count())
    # the chat template's rendering of [image, text] content (SmolVLM2's processor expands one image alike)
    text = "<|im_start|>User:<image>What is in the image?<end_of_utterance>\nAssistant:"
    expected = processor(text=[text], images=[random_images(1, 60)], return_tensors="pt")["input_ids"][0]
    assert smolvlm.build_prompt(TURNS, target=False).input_ids.tolist() == expected.tolist()
    later_turn = smolvlm.tokenizer.apply_chat_template(
        [{"role": "user", "content": smolvlm.user_content("b", with_image=False)}, {"role": "assistant", "content": "c"}],
        tokenize=False, chat_template=smolvlm.chat_template)
    assert later_turn == "<|im_start|>User: b<end_of_utterance>\nAssistant: c<end_of_utterance>\n"


def test_smolvlm_the_pixel_shuffle_makes_as_many_tokens_as_the_prompt_holds(smolvlm):
    made = []
    handle = smolvlm.model.model.connector.register_forward_hook(lambda module, args, output: made.append(output.shape))
    prompt = smolvlm.build_prompt(TURNS)
    try:
        with torch.no_grad():
            smolvlm.target_logits(torch.randn(2, 3, 56, 56), prompt)
    finally:
        handle.remove()
    assert made == [(2, len(prompt.image_positions), smolvlm.hidden_size)]
    assert SmolVLMAdapter.architecture("full").vision_config.image_size // 14 == 27  # 81 tokens at 384 px
    with pytest.raises(UserError, match="SmolVLM takes 56 px"):
        smolvlm.use_resolution(42)


def test_smolvlm_the_public_config_layouts_load(smolvlm, tmp_path):
    """HuggingFaceTB/SmolVLM-Instruct's config.json (idefics3, a llama text_config with rope_theta)
    and SmolVLM2's (smolvlm), with the tiny's sizes."""
    config = smolvlm.model.config
    vision, text = config.vision_config, config.text_config
    text_json = {**tiny_text_fields(text, "hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                                    "max_position_embeddings", "rms_norm_eps", "pad_token_id", "initializer_range"),
                 "model_type": "llama", "rope_theta": 10000.0, "tie_word_embeddings": False}
    vision_json = {name: getattr(vision, name) for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                            "num_attention_heads", "patch_size", "image_size")}
    hub = {"architectures": ["Idefics3ForConditionalGeneration"], "model_type": "idefics3",
           "image_token_id": config.image_token_id, "scale_factor": config.scale_factor, "tie_word_embeddings": False,
           "text_config": text_json, "vision_config": {"model_type": "idefics3", **vision_json},
           "vocab_size": text.vocab_size}
    original, loaded = logits_after_reload(smolvlm, tmp_path / "smolvlm", hub)
    assert torch.allclose(original, loaded, atol=1e-5)

    smolvlm2 = SmolVLM2Adapter.tiny()
    hub2 = dict(hub, architectures=["SmolVLMForConditionalGeneration"], model_type="smolvlm",
                vision_config={"model_type": "smolvlm_vision", **vision_json})
    original, loaded = logits_after_reload(smolvlm2, tmp_path / "smolvlm2", hub2)
    assert torch.allclose(original, loaded, atol=1e-5)
    with pytest.raises(UserError, match="holds a smolvlm model, not idefics3"):
        SmolVLMAdapter.load(str(tmp_path / "smolvlm2"))


# -- InternVL ------------------------------------------------------------------------------------
def test_internvl_pixels_and_prompt_are_the_processors_with_tiling_off(internvl):
    from transformers import InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    images = random_images(2, 448)
    processor = GotOcr2ImageProcessorPil(crop_to_patches=False, size={"height": 448, "width": 448},
                                         image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    expected = processor(images=images, return_tensors="pt")
    ours = internvl.pixel_inputs(internvl.preprocess(images, 448))
    assert ours["pixel_values"].shape == expected["pixel_values"].shape == (2, 3, 448, 448)
    assert torch.allclose(ours["pixel_values"], expected["pixel_values"], atol=1e-5)
    # the processor's own expansion of <IMG_CONTEXT> (its constructor wants a video processor)
    expansion = SimpleNamespace(start_image_token="<img>", end_image_token="</img>", image_token="<IMG_CONTEXT>",
                                image_seq_length=internvl.model.config.image_seq_length)
    image_text = InternVLProcessor.replace_image_token(expansion, expected, 0)
    prompt = internvl.build_prompt(TURNS, target=False)
    assert prompt.input_ids.tolist() == expanded_prompt_ids(internvl, image_text)
    tokens = internvl.tokenizer.convert_ids_to_tokens(prompt.input_ids.tolist())
    assert tokens[:3] == ["<|im_start|>", "user", "<img>"] and tokens[7] == "</img>"
    assert InternVLAdapter.architecture("full").image_seq_length == 256
    with pytest.raises(UserError, match="this model takes 56 px"):
        internvl.use_resolution(28)


def test_internvl_the_public_config_layout_loads(internvl, tmp_path):
    """OpenGVLab/InternVL3-8B-hf's config.json: a qwen2 text_config with rope_theta, an
    internvl_vision config with [height, width] sizes; the tiny's sizes."""
    config = internvl.model.config
    vision, text = config.vision_config, config.text_config
    text_json = {**tiny_text_fields(text, "hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "num_key_value_heads", "vocab_size",
                                    "max_position_embeddings", "rms_norm_eps", "pad_token_id", "eos_token_id",
                                    "initializer_range"),
                 "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_theta": 1000000.0,
                 "rope_scaling": None, "sliding_window": None, "use_sliding_window": False}
    vision_json = {"architectures": ["InternVisionModel"], "model_type": "internvl_vision",
                   **{name: getattr(vision, name) for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                               "num_attention_heads")},
                   "image_size": [56, 56], "patch_size": [14, 14], "hidden_act": "gelu", "norm_type": "layer_norm",
                   "layer_scale_init_value": 0.1, "use_qk_norm": False, "use_mean_pooling": True,
                   "attention_bias": True}
    hub = {"architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl",
           "downsample_ratio": 0.5, "image_seq_length": config.image_seq_length,
           "image_token_id": config.image_token_id, "projector_hidden_act": "gelu", "tie_word_embeddings": False,
           "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
           "text_config": text_json, "vision_config": vision_json}
    original, loaded = logits_after_reload(internvl, tmp_path, hub)
    assert torch.allclose(original, loaded, atol=1e-5)


# -- where the image tokens lie ------------------------------------------------------------------
def patch_coordinates(side):
    """[1, side * side, 2]: each patch token's (row, column)."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([rows, cols], -1).reshape(1, side * side, 2).float()


def assert_raster_grid(shuffled, grid, block):
    """Every LM token k holds only patches of the block at (k // columns, k % columns)."""
    rows, cols, first = grid
    assert first == 0 and shuffled.shape[1] == rows * cols
    coordinates = shuffled[0].reshape(rows * cols, -1, 2)  # token, patch in the block, (row, column)
    k = torch.arange(rows * cols)
    assert torch.equal(coordinates[..., 0] // block, (k // cols)[:, None].expand_as(coordinates[..., 0]).float())
    assert torch.equal(coordinates[..., 1] // block, (k % cols)[:, None].expand_as(coordinates[..., 1]).float())


def test_the_shuffled_image_tokens_lie_on_the_declared_grid(smolvlm, internvl):
    grid = smolvlm.image_token_grid()
    assert grid[0] * grid[1] == smolvlm.image_token_count()
    connector = smolvlm.model.model.connector
    assert_raster_grid(connector.pixel_shuffle(patch_coordinates(4), connector.scale_factor), grid, 2)
    grid = internvl.image_token_grid()
    assert grid[0] * grid[1] == internvl.image_token_count()
    shuffled = internvl.model.model.pixel_shuffle(patch_coordinates(4).reshape(1, 4, 4, 2), 0.5)
    assert_raster_grid(shuffled.reshape(1, -1, 8), grid, 2)
