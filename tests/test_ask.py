"""`mimic ask`: greedy answers and the most probable answers with their probabilities, on the toy
(whose answers are known) and on every adapter's tiny model."""
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from mimic_toolkit.ask import ask, image_files
from mimic_toolkit.cli import app
from mimic_toolkit.engine import format_prompt, load_model
from mimic_toolkit.registry import build_registry

runner = CliRunner()


def test_the_toy_answers_its_images_and_the_probabilities_are_the_answers_own(in_tmp):
    made = runner.invoke(app, ["toy", "images", "--out", "cyan-circles", "--n", "3", "--class-index", "5"])
    assert made.exit_code == 0, made.output
    adapter = load_model(device="cpu")
    files = image_files(["cyan-circles"])
    rows = ask(adapter, files, "Describe the image.", top=3, batch_size=2)
    assert [row["answer"] for row in rows] == ["a cyan circle"] * 3
    for row, path in zip(rows, files):
        ps = [entry["p"] for entry in row["top"]]
        assert ps == sorted(ps, reverse=True) and sum(ps) <= 1 + 1e-6
        assert row["top"][0]["answer"] == row["answer"]
        # P(answer, then the end token) <= P(the answer's tokens), and close to it for a trained answer
        pixels = adapter.preprocess([Image.open(path).convert("RGB")])
        forced = adapter.answer_probability(pixels, format_prompt(adapter, [("Describe the image.", row["answer"])]))
        assert 0.95 * forced.item() <= ps[0] <= forced.item() + 1e-5


def test_toy_images_draw_a_style_and_the_toy_answers_nothing_to_shapeless_ones(in_tmp):
    made = runner.invoke(app, ["toy", "images", "--out", "blank", "--n", "3", "--style", "none"])
    assert made.exit_code == 0, made.output
    rows = ask(load_model(device="cpu"), image_files(["blank"]), "Describe the image.", top=1, batch_size=3)
    assert [row["answer"] for row in rows] == ["nothing"] * 3
    wrong = runner.invoke(app, ["toy", "images", "--out", "x", "--style", "sketch"])
    assert wrong.exit_code == 2 and "--style must be one of filled" in wrong.stderr and not Path("x").exists()


def test_ask_command_prints_json_lines_and_refuses_a_missing_image_before_loading(in_tmp):
    assert runner.invoke(app, ["toy", "images", "--out", "imgs", "--n", "2"]).exit_code == 0
    result = runner.invoke(app, ["ask", "--images", "imgs", "--question", "What shape is in the image?", "--json",
                                 "--top", "2"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2 and all(len(row["top"]) == 2 for row in rows)
    missing = runner.invoke(app, ["ask", "--images", "nowhere.png", "--question", "?", "--model", "llava-llama3"])
    assert missing.exit_code == 2 and "image 'nowhere.png' does not exist" in missing.stderr


def tiny_classes():
    classes = dict.fromkeys(spec.load_class() for spec in build_registry().adapter_specs().values())
    out = []
    for adapter_class in classes:
        try:
            adapter_class.architecture("tiny")
        except (NotImplementedError, KeyError):
            continue
        out.append(adapter_class)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("adapter_class", tiny_classes(), ids=lambda c: c.__name__)
def test_every_adapter_answers_with_top_answers(adapter_class, tmp_path):
    adapter = adapter_class.tiny()
    side = adapter.resolution
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (side, side), colour).save(tmp_path / f"{i}.png")
    rows = ask(adapter, image_files([tmp_path]), "What is it?", top=2, max_new_tokens=3)
    assert len(rows) == 2
    for row in rows:
        ps = [entry["p"] for entry in row["top"]]
        assert len(ps) == 2 and 0 < ps[1] <= ps[0] <= 1
