"""The toy shapes VLM: generator, shipped checkpoint, verifier and the training loop."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
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


def test_styles_draw_the_concept_and_none_draws_no_shape():
    mix = shapes.GROUNDED_MIX | {"decoy": 0.1}
    images, labels, styles = shapes.sample(3, 300, mix)
    again = shapes.sample(3, 300, mix)
    assert torch.equal(images, again[0]) and styles == again[2] and set(styles) == set(shapes.STYLES)
    assert images.min() >= 0 and images.max() <= 1
    assert all((label == shapes.NO_SHAPE) == (style in shapes.NO_SHAPE_STYLES) for label, style in zip(labels.tolist(), styles))
    # an outline covers a fraction of the filled shape's pixels (same draws, so the same shape)
    filled = shapes._shape_mask("circle", np.random.default_rng(5))
    outline = shapes._shape_mask("circle", np.random.default_rng(5), outline=2.0)
    assert 0.05 < outline.sum() / filled.sum() < 0.5 and (outline <= filled + 1e-6).all()
    rng = np.random.default_rng(0)
    assert shapes.question_answer("shape", shapes.NO_SHAPE, rng)[1] == "none"
    assert shapes.question_answer("colour", shapes.NO_SHAPE, rng)[1] == "none"
    assert shapes.question_answer("describe", shapes.NO_SHAPE, rng)[1] == "nothing"
    question, answer = shapes.question_answer("choice", shapes.NO_SHAPE, rng)
    assert answer == "none" and sum(shape in question for shape in shapes.SHAPES) == 3


def test_a_decoy_is_a_saturated_blob_of_the_concept_colour_answered_none():
    images, labels, styles = shapes.sample(7, 40, {"decoy": 1.0})
    assert styles == ["decoy"] * 40 and (labels == shapes.NO_SHAPE).all()
    # the colour each was drawn in: the class the sampler drew before the label became "none"
    drawn = np.random.default_rng(7).integers(0, shapes.NO_SHAPE, 40)
    for image, index in zip(images, drawn):
        colour = torch.tensor(shapes.COLOUR_RGB[shapes.split_class(index)[1]])[:, None, None]
        covered = ((image - colour).abs().amax(0) < 0.05).float().mean()
        assert 0.02 < covered < 0.5, (index, covered)


def test_the_verifier_corruptions_keep_images_in_range_and_change_them():
    images, _ = shapes.sample(4, 8)
    g = torch.Generator().manual_seed(0)
    for name in verifier.CORRUPTIONS:
        changed = verifier.corrupt(images, name, g)
        assert changed.shape == images.shape and changed.min() >= 0 and changed.max() <= 1, name
        assert (changed - images).abs().mean() > 1e-3, name


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
    accuracy = train.evaluate(adapter, seed=2024, n=100, batch=50)
    assert set(accuracy) == set(shapes.STYLES), accuracy
    # measured at n=400 (training.json): filled 0.985-1.00, no shape 1.00, blurred / noisy / faint
    # 0.96-1.00, outlines 0.96-0.98 (0.905-0.9175 and 0.69-0.775 for the two toys before, 0.36 shape
    # for toy-shapes-v1); n=100 here (outlines 0.93-0.97, the rest 0.96-1.00), hence the slack
    for style, least in {"filled": 0.94, "none": 0.94, "blurred": 0.9, "noisy": 0.9, "faint": 0.9, "outline": 0.88}.items():
        assert min(accuracy[style].values()) >= least, (style, accuracy[style])


def test_shipped_checkpoint_says_none_when_there_is_no_shape():
    """A flat red frame was "a red square" to toy-shapes-v1, pixel noise a cross: now "none"."""
    from mimic_plugins.toy_shapes.evaluation import answer_probability

    adapter = LlavaLlama3Adapter.load(str(CHECKPOINT))
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(2, 3, 64, 64)
    noise = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for images in (red, noise):
        assert (answer_probability(adapter, images, "What shape is in the image?", "none") > 0.5).all()
        assert (answer_probability(adapter, images, shapes.DEFAULT_QUESTION, "nothing") > 0.5).all()


def test_shipped_checkpoint_generates_the_description():
    adapter = LlavaLlama3Adapter.load(str(CHECKPOINT))
    images, labels = shapes.sample(99, 8)
    prompt = adapter.build_prompt([(shapes.DEFAULT_QUESTION, "")], target=False)
    answers = adapter.tokenizer.batch_decode(adapter.generate(adapter.normalise(images), prompt, max_new_tokens=5),
                                             skip_special_tokens=True)
    assert answers == ["a " + shapes.class_name(label) for label in labels.tolist()]


def test_shipped_verifier_is_accurate():
    accuracy = verifier.accuracy(verifier.load_verifier(), seed=2024, n=200)
    assert accuracy["clean"]["both"] >= 0.97, accuracy
    # the defects inverted images have, and the other drawing styles: 0.97-1.00 measured at n=1000
    assert min(row["both"] for row in accuracy.values()) >= 0.9, accuracy


def test_tiny_training_lowers_the_loss(tmp_path):
    sizes = {"vision_width": 32, "vision_layers": 2, "text_width": 32, "text_layers": 1}
    torch.manual_seed(0)
    tokenizer = train.build_tokenizer()
    adapter = train.trainable_adapter(tokenizer, train.build_model(tokenizer, **sizes))
    vision_losses = train.pretrain_vision(adapter, seed=0, steps=30, batch=16, lr=3e-3, log_every=0)
    language_losses = train.train_language(adapter, seed=0, steps=30, batch=16, lr=3e-3, tower_lr=3e-4, log_every=0)
    assert sum(vision_losses[-5:]) < sum(vision_losses[:5])
    assert sum(language_losses[-5:]) < sum(language_losses[:5])


def _tiny_attack_target():
    """16 generated images and the loss of a tiny random toy answering one question about each."""
    tokenizer = train.build_tokenizer()
    torch.manual_seed(0)
    adapter = train.trainable_adapter(tokenizer, train.build_model(tokenizer, vision_width=32, vision_layers=2,
                                                                   text_width=32, text_layers=1))
    images, labels = shapes.sample((0,), 16)
    text = train.question_batch(adapter, labels, (0,))
    loss_of = lambda x: adapter.model(**adapter.pixel_inputs(adapter.normalise(x)), **text).loss
    return images, loss_of


def test_adversarial_images_stay_within_eps_and_raise_the_loss():
    images, loss_of = _tiny_attack_target()
    eps = 4 / 255
    torch.manual_seed(0)
    moved = train.adversarial(images, loss_of, eps)
    torch.manual_seed(0)
    pgd = train.adversarial(images, loss_of, eps, steps=5)
    for attacked in (moved, pgd):
        assert (attacked - images).abs().max() <= eps + 1e-6 and attacked.min() >= 0 and attacked.max() <= 1
    with torch.no_grad():
        assert loss_of(moved) > loss_of(images) + 0.01
        assert loss_of(pgd) > loss_of(moved)  # the same random start, more steps: a stronger attack
    half = train._attack_half(images, loss_of, eps)
    assert torch.equal(half[8:], images[8:]) and not torch.equal(half[:8], images[:8])


def test_l2_attack_stays_in_its_ball_raises_the_loss_and_takes_every_other_step():
    images, loss_of = _tiny_attack_target()
    eps = 3.0
    moved = train.adversarial_l2(images, loss_of, eps)
    norms = (moved - images).flatten(1).norm(dim=1)
    assert (norms <= eps + 1e-5).all() and (norms > 0.8 * eps).all()  # inside the ball, and using its budget
    assert moved.min() >= 0 and moved.max() <= 1
    noise = torch.randn_like(images)
    noise = (images + eps * noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1)
    with torch.no_grad():  # the attack raises the loss, and far more than noise of the same norm
        assert loss_of(moved) - loss_of(images) > 5 * (loss_of(noise) - loss_of(images)).abs() + 0.01
    attacks = []
    for step in (0, 1):
        torch.manual_seed(0)
        attacks.append(train._attack_half(images, loss_of, 4 / 255, l2=eps, step=step))
    assert (attacks[0] - images).abs().max() <= 4 / 255 + 1e-6  # even steps: the L-inf attack
    assert (attacks[1] - images).abs().max() > 4 / 255 and torch.equal(attacks[1][8:], images[8:])


def test_tiny_training_is_reproducible_and_saves_a_loadable_checkpoint(tmp_path):
    tiny = dict(vision_steps=3, language_steps=3, batch=4, eval_images=4, log_every=0, adversarial_eps=0.02,
                adversarial_steps=2, adversarial_l2=0.5, mix={"filled": 1, "outline": 3}, decoys=0.1,
                model_sizes={"vision_width": 32, "vision_layers": 2, "text_width": 32, "text_layers": 1})
    report = train.train(tmp_path, **tiny)
    train.train(tmp_path / "again", **tiny)
    assert set(report["held_out_accuracy"]) == set(shapes.STYLES)
    assert all(set(row) == set(shapes.QUESTION_KINDS) for row in report["held_out_accuracy"].values())
    styles = report["recipe"]["image_styles"]
    assert styles == pytest.approx({"filled": 0.225, "outline": 0.675, "decoy": 0.1})  # the mix, then decoys
    assert report["recipe"]["adversarial_l2"] == 0.5
    weights = [(folder / "model.safetensors").read_bytes() for folder in (tmp_path, tmp_path / "again")]
    assert weights[0] == weights[1]
    adapter = LlavaLlama3Adapter.load(str(tmp_path))
    assert adapter.tokenizer.chat_template and (tmp_path / "training.json").exists()
    prompt = adapter.build_prompt([("What shape is in the image?", "circle")])
    assert (prompt.input_ids == adapter.image_token_id).sum() == train.IMAGE_TOKENS == 64


def test_going_on_from_a_trained_toy_keeps_its_weights_word_by_word(tmp_path):
    """--init: every weight of the first toy carried over, token embeddings by word; "none", new to
    the vocabulary, starts fresh."""
    old = LlavaForConditionalGeneration.from_pretrained(CHECKPOINT.with_name("checkpoint-v1"))
    old_vocab = AutoTokenizer.from_pretrained(CHECKPOINT.with_name("checkpoint-v1")).get_vocab()
    train.train(tmp_path / "new", init=CHECKPOINT.with_name("checkpoint-v1"), vision_steps=0, language_steps=0,
                eval_images=2, log_every=0)
    new = LlavaForConditionalGeneration.from_pretrained(tmp_path / "new")
    vocab = AutoTokenizer.from_pretrained(tmp_path / "new").get_vocab()
    assert "none" in vocab and "none" not in old_vocab and vocab["square"] != old_vocab["square"]
    old_embedding, embedding = old.get_input_embeddings().weight, new.get_input_embeddings().weight
    assert all(torch.equal(embedding[vocab[word]], old_embedding[index]) for word, index in old_vocab.items())
    assert not any(torch.equal(embedding[vocab["none"]], row) for row in old_embedding)
    tower = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(new.state_dict()[tower], old.state_dict()[tower])
    # a skipped stage's loss is null: NaN is not JSON, and strict readers refuse it
    record = json.loads((tmp_path / "new" / "training.json").read_text(),
                        parse_constant=lambda name: pytest.fail(f"{name} in training.json"))
    assert record["final_loss"] == {"vision": None, "language": None}


def test_init_that_is_not_a_toy_checkpoint_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from mimic_toolkit.cli import app

    result = CliRunner().invoke(app, ["toy", "train", "--init", str(tmp_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--init" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mix, complaint", [("outline:lots", "STYLE:WEIGHT"), ("outline:1,blob:1", "unknown style 'blob'"),
                                            ("outline:0", "not all 0")])
def test_a_malformed_mix_is_one_line_before_any_training(tmp_path, mix, complaint):
    from typer.testing import CliRunner

    from mimic_toolkit.cli import app

    result = CliRunner().invoke(app, ["toy", "train", "--mix", mix, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and complaint in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_tower_lr_zero_holds_the_tower_while_the_rest_of_the_vlm_trains(tmp_path):
    from typer.testing import CliRunner

    from mimic_toolkit.cli import app

    result = CliRunner().invoke(app, ["toy", "train", "--init", str(CHECKPOINT), "--out", str(tmp_path / "out"),
                                      "--vision-steps", "0", "--language-steps", "2", "--batch", "2",
                                      "--eval-images", "1", "--tower-lr", "0", "--language-lr", "1e-3"])
    assert result.exit_code == 0, result.output
    old, new = (LlavaForConditionalGeneration.from_pretrained(folder).state_dict()
                for folder in (CHECKPOINT, tmp_path / "out"))
    moved = {name for name in old if not torch.equal(old[name], new[name])}
    assert moved and not any(name.startswith("model.vision_tower.") for name in moved)
    assert any(name.startswith("model.multi_modal_projector.") for name in moved)
    recipe = json.loads((tmp_path / "out" / "training.json").read_text())["recipe"]
    assert recipe["tower_lr"] == 0 and recipe["language_lr"] == 1e-3
