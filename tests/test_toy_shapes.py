"""The toy shapes VLM: generator, shipped checkpoint, verifier and the training loop."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from mimic_plugins.llava_llama3.adapter import LlavaLlama3Adapter
from mimic_plugins.toy_shapes import shapes, train, verifier

CHECKPOINT = Path(train.__file__).with_name("checkpoint")
torch.set_num_threads(2)


def test_generator_is_deterministic_per_seed():
    first, first_labels = shapes.sample(7, 16)
    again, again_labels = shapes.sample(7, 16)
    other, _ = shapes.sample(8, 16)
    assert first.shape == (16, 3, 64, 64) and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again) and torch.equal(first_labels, again_labels)
    assert not torch.equal(first, other)


def test_class_index_and_questions():
    assert shapes.class_index("triangle", "blue") == 2 * 6 + 2
    assert shapes.class_name(shapes.class_index("cross", "cyan")) == "cyan cross"
    rng = np.random.default_rng(0)
    question, answer = shapes.question_answer("choice", shapes.class_index("square", "red"), rng)
    assert answer == "square" and "square" in question and question.count(",") == 1


def test_shipped_checkpoint_loads_offline():
    model = LlavaForConditionalGeneration.from_pretrained(CHECKPOINT)
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids(train.IMAGE_TOKEN)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.chat_template == train.CHAT_TEMPLATE


def test_shipped_checkpoint_answers_held_out_images():
    adapter = LlavaLlama3Adapter.load(str(CHECKPOINT))
    accuracy = train.evaluate(adapter, seed=2024, n=50, batch=50)
    assert min(accuracy.values()) >= 0.95, accuracy


def test_shipped_checkpoint_generates_the_description():
    adapter = LlavaLlama3Adapter.load(str(CHECKPOINT))
    images, labels = shapes.sample(99, 8)
    prompt = adapter.build_prompt([(shapes.DEFAULT_QUESTION, "")], target=False)
    answers = adapter.tokenizer.batch_decode(adapter.generate(adapter.normalise(images), prompt, max_new_tokens=5),
                                             skip_special_tokens=True)
    assert answers == ["a " + shapes.class_name(label) for label in labels.tolist()]


def test_shipped_verifier_is_accurate():
    accuracy = verifier.accuracy(verifier.load_verifier(), seed=2024, n=200)
    assert accuracy["both"] >= 0.95, accuracy


def test_tiny_training_lowers_the_loss(tmp_path):
    sizes = {"vision_width": 32, "vision_layers": 2, "text_width": 32, "text_layers": 1}
    torch.manual_seed(0)
    tokenizer = train.build_tokenizer()
    adapter = train.trainable_adapter(tokenizer, train.build_model(tokenizer, **sizes))
    vision_losses = train.pretrain_vision(adapter, seed=0, steps=30, batch=16, lr=3e-3, log_every=0)
    language_losses = train.train_language(adapter, seed=0, steps=30, batch=16, lr=3e-3, tower_lr=3e-4, log_every=0)
    assert sum(vision_losses[-5:]) < sum(vision_losses[:5])
    assert sum(language_losses[-5:]) < sum(language_losses[:5])


def test_tiny_training_is_reproducible_and_saves_a_loadable_checkpoint(tmp_path):
    tiny = dict(vision_steps=3, language_steps=3, batch=4, eval_images=4, log_every=0,
                model_sizes={"vision_width": 32, "vision_layers": 2, "text_width": 32, "text_layers": 1})
    report = train.train(tmp_path, **tiny)
    train.train(tmp_path / "again", **tiny)
    assert set(report["held_out_accuracy"]) == set(shapes.QUESTION_KINDS)
    weights = [(folder / "model.safetensors").read_bytes() for folder in (tmp_path, tmp_path / "again")]
    assert weights[0] == weights[1]
    adapter = LlavaLlama3Adapter.load(str(tmp_path))
    assert adapter.tokenizer.chat_template and (tmp_path / "training.json").exists()
    prompt = adapter.build_prompt([("What shape is in the image?", "circle")])
    assert (prompt.input_ids == adapter.image_token_id).sum() == train.IMAGE_TOKENS == 64
