"""The LLaVA-Llama-3 adapter: the Intel folder layout, prompt building (the contract suite runs on
every adapter in test_adapter_contract.py, and here catches a broken one)."""
import json

import pytest
import torch

from mimic_plugins.llava_llama3.adapter import LlavaLlama3Adapter
from mimic_toolkit.adapter import IGNORE_INDEX
from mimic_toolkit.errors import UserError
from mimic_toolkit.testing import check_adapter


def test_contract_catches_an_adapter_that_miscounts_image_tokens(tiny_llava):
    class Miscounting(LlavaLlama3Adapter):
        def image_token_count(self):
            return super().image_token_count() - 1

    broken = Miscounting(tiny_llava.model, tiny_llava.tokenizer)
    with pytest.raises(Exception):
        check_adapter(broken)


def test_loads_the_intel_layout_folder_and_builds_the_same_prompt(tiny_checkpoint, tiny_llava):
    loaded = LlavaLlama3Adapter.load(str(tiny_checkpoint))
    turns = [("Choose the snack shown in the image: Pretzel, Fries or Potato Chips?", "Pretzel")]
    a, b = loaded.build_prompt(turns), tiny_llava.build_prompt(turns)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    for p_loaded, p_tiny in zip(loaded.model.parameters(), tiny_llava.model.parameters()):
        assert torch.equal(p_loaded, p_tiny)
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_prompt_has_one_bos_expanded_image_tokens_and_labels_on_the_target_only(tiny_llava):
    prompt = tiny_llava.build_prompt([("What is in the image?", "a red circle")])
    ids = prompt.input_ids.tolist()
    bos = tiny_llava.tokenizer.bos_token_id
    assert ids.count(bos) == 1 and ids[0] == bos  # the template's BOS, no second one
    n_image = (32 // 8) ** 2  # "default" strategy drops CLS
    assert ids.count(tiny_llava.image_token_id) == n_image == len(prompt.image_positions)
    target = tiny_llava.tokenizer("a red circle", add_special_tokens=False).input_ids
    assert prompt.labels[-len(target):].tolist() == target
    assert (prompt.labels[:-len(target)] == IGNORE_INDEX).all()
    text = tiny_llava.tokenizer.decode(prompt.input_ids[: -len(target)])
    assert text.rstrip().endswith("<|start_header_id|> assistant <|end_header_id|>")  # no end-of-turn after the target


def test_multi_turn_context_keeps_earlier_answers_out_of_the_labels(tiny_llava):
    prompt = tiny_llava.build_prompt([("What is in the image?", "a circle"), ("What colour is it?", "red")])
    assert prompt.target_ids.tolist() == tiny_llava.tokenizer("red", add_special_tokens=False).input_ids
    assert int((prompt.input_ids == tiny_llava.image_token_id).sum()) == 16  # the image only once


def test_feature_sites_are_patch_embedding_and_every_mlp(tiny_llava):
    sites = list(tiny_llava.feature_sites())
    assert sites == ["vision.patch_embedding", "vision.layers.0.mlp", "vision.layers.1.mlp"]


def test_target_logits_cover_only_the_target_positions(tiny_llava):
    prompt = tiny_llava.build_prompt([("What is in the image?", "a red circle")])
    images = torch.randn(2, 3, 32, 32)
    logits = tiny_llava.target_logits(images, prompt)
    full = tiny_llava.model(input_ids=prompt.input_ids[None].expand(2, -1), pixel_values=images).logits
    n = prompt.n_target
    assert logits.shape == (2, n, len(tiny_llava.tokenizer))
    assert torch.allclose(logits, full[:, -n - 1:-1].float(), atol=1e-5)


def test_preprocess_resizes_shortest_side_and_centre_crops(tiny_llava):
    from PIL import Image

    image = Image.new("RGB", (64, 32), (255, 0, 0))
    x = tiny_llava.preprocess([image])
    assert x.shape == (1, 3, 32, 32)
    assert torch.allclose(tiny_llava.denormalise(x)[0, 0], torch.ones(32, 32), atol=1e-4)


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "missing", "does not exist"),
    (lambda tmp: tmp, "not a model folder"),
])
def test_bad_checkpoint_folders_are_named(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        LlavaLlama3Adapter.load(str(make(tmp_path)))


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UserError, match="holds a llama model"):
        LlavaLlama3Adapter.load(str(tmp_path))
