"""toy-shapes-qwen: the toy's data and questions on Qwen2-VL's code path (`mimic toy train --layout
qwen2-vl`), loaded through the registry like any model."""
from pathlib import Path

import pytest
import torch

from mimic_plugins.qwen2_vl.adapter import QWEN2_VL_TEMPLATE, Qwen2VLAdapter
from mimic_plugins.toy_shapes import shapes, train
from mimic_toolkit.engine import format_prompt, load_model

SHIPPED = Path(train.__file__).with_name("checkpoint-qwen")
TINY = dict(vision_steps=3, language_steps=3, batch=4, eval_images=4, log_every=0, layout="qwen2-vl",
            model_sizes={"vision_width": 32, "vision_layers": 2, "text_width": 64, "text_layers": 1})


def test_training_in_the_qwen_layout_saves_a_model_the_registry_loads(tmp_path):
    report = train.train(tmp_path, **TINY)
    assert report["layout"] == "qwen2-vl" and set(report["held_out_accuracy"]) == set(shapes.STYLES)
    adapter = load_model("toy-shapes-qwen", checkpoint=str(tmp_path), device="cpu")
    assert isinstance(adapter, Qwen2VLAdapter) and adapter.tokenizer.chat_template == QWEN2_VL_TEMPLATE
    assert adapter.resolution == 64  # the spec's side, not Qwen2-VL's 448
    prompt = format_prompt(adapter, [("What shape is in the image?", "circle")])
    assert (prompt.input_ids == adapter.image_token_id).sum() == (64 // 16) ** 2  # 8 px patches, 2 x 2 merge
    assert adapter.tokenizer.unk_token_id not in prompt.input_ids.tolist()  # every template word is known
    batch = train.make_batch(adapter, (0, 1, 0), 3)
    assert batch["pixel_values"].shape == (3 * 64, 3 * 2 * 8 * 8) and batch["image_grid_thw"].tolist() == [[1, 8, 8]] * 3
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == adapter.image_token_id)


def test_an_unknown_layout_is_one_line(tmp_path):
    from mimic_toolkit.errors import UserError

    with pytest.raises(UserError, match="--layout takes one of llava, qwen2-vl"):
        train.train(tmp_path / "out", **{**TINY, "layout": "idefics"})
    assert not (tmp_path / "out").exists()


def test_shipped_qwen_toy_loads_and_answers_held_out_images():
    import json

    adapter = load_model("toy-shapes-qwen", device="cpu")
    assert adapter.checkpoint and Path(adapter.checkpoint).resolve() == SHIPPED.resolve()
    recorded = json.loads((SHIPPED / "training.json").read_text())
    assert recorded["layout"] == "qwen2-vl"
    accuracy = train.evaluate(adapter, seed=2024, n=50, batch=50, styles=["filled"])["filled"]  # new images
    assert accuracy["colour"] >= 0.95, accuracy
    assert accuracy["shape"] >= 0.6, accuracy  # 0.72 measured (chance: 0.25)
