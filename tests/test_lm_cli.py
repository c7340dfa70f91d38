"""The language-model commands end to end on the tiny LLaVA checkpoint, inverting an LM direction,
and their bad inputs: one `error:` line, exit code 2, nothing written."""
import json

import pytest
import torch
from typer.testing import CliRunner

from mimic_toolkit.cli import app
from mimic_toolkit.config import resolve
from mimic_toolkit.inversion import ActiveTerm, Inversion
from mimic_toolkit.lm_objective import parse_objective
from mimic_toolkit.terms import lm_direction

from lm_helpers import colour_images

runner = CliRunner()
QUESTION = ["--question", "What is in the image?"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.output


def assert_user_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


@pytest.fixture
def data(in_tmp):
    colours = ["red", "blue", "green", "red", "blue", "green"]
    paths = colour_images(in_tmp / "images", colours)
    with (in_tmp / "data.jsonl").open("w") as f:
        for path, colour in zip(paths, colours):
            f.write(json.dumps({"image": f"images/{path.name}", "labels": {"colour": colour}}) + "\n")
    return in_tmp


def capture(checkpoint, out, *extra):
    return invoke("capture", "--model", "llava-llama3", "--checkpoint", checkpoint, "--dataset", "data.jsonl",
                  *QUESTION, "--max-new-tokens", "3", "--out", out, *extra)


def test_capture_concepts_steering_and_shift_through_the_cli(tiny_checkpoint, data):
    assert capture(tiny_checkpoint, "last", "--site", "lm.1", "--tokens", "last-prompt").exit_code == 0
    assert capture(tiny_checkpoint, "gen", "--site", "lm.1", "--tokens", "generated").exit_code == 0
    index = [json.loads(line) for line in (data / "gen" / "index.jsonl").read_text().splitlines()]
    assert len(index) == 6 and all("generated" in e and e["labels"]["colour"] for e in index)

    output = ok("concepts", "fit", "--features", "last", "--method", "kmeans", "--k", "3", "--out", "concepts")
    assert "concept  0" in output and "purity: colour" in output and (data / "concepts" / "report.html").is_file()
    output = ok("concepts", "project", "--concepts", "concepts", "--features", "gen", "--out", "projected.jsonl")
    assert output.count("\n") == 6 and len((data / "projected.jsonl").read_text().splitlines()) == 6

    ok("steer", "build", "--base", "last", "--target", "gen", "--out", "v.safetensors")
    output = ok("steer", "apply", "--model", "llava-llama3", "--checkpoint", tiny_checkpoint, "--vector",
                "v.safetensors", "--alpha", "4", "--positions", "last-prompt", "--dataset", "data.jsonl", *QUESTION,
                "--max-new-tokens", "3", "--out", "answers.jsonl")
    assert "answers changed (site lm.1, alpha 4.0, positions last-prompt)" in output
    rows = [json.loads(line) for line in (data / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"before", "after"} <= set(rows[0])

    output = ok("shift", "--original", "last", "--finetuned", "gen", "--k", "2", "--out", "shift.json")
    result = json.loads((data / "shift.json").read_text())
    assert len(result["concepts"]) == 2 and "word_overlap_shifted" in result["concepts"][0]
    assert "mean cosine to the fine-tuned match" in output


def test_inverting_a_neuron_raises_its_activation(tiny_llava):
    prompt = tiny_llava.build_prompt([("What is in the image?", "red")])
    config = resolve([dict(iterations=15, batch_size=2, lr=0.1, jitter=0, flip=False, resolution=32)])
    objective = parse_objective("neuron:lm.1:5", tiny_llava, "llava-llama3", prompt)
    assert objective.positions.tolist() == [len(prompt.input_ids) - 2]  # the token before the one-token answer
    inversion = Inversion(tiny_llava, prompt, config, [ActiveTerm("lm", lm_direction, 1.0, reads=("lm_objective",))], lm_objective=objective)
    first = inversion.run_step(want_metrics=True)["terms"]["lm"]
    for _ in range(13):
        inversion.run_step()
    last = inversion.run_step(want_metrics=True)["terms"]["lm"]
    inversion.close()
    assert last < first - 0.5  # the loss is minus the unit's activation
    image = parse_objective("neuron:lm.1:5", tiny_llava, "llava-llama3", prompt, positions="image")
    assert torch.equal(image.positions, prompt.image_positions)


def test_invert_with_an_objective_turns_the_answer_off(tiny_checkpoint, data):
    ok("invert", "--model", "llava-llama3", "--checkpoint", tiny_checkpoint, "--objective", "neuron:lm.0:1",
       "--feature-loss-scale", "0", "--iterations", "3", "--batch-size", "1", "--log-every", "1", "--quiet",
       *QUESTION, "--answer", "red", "--outputs", "run")
    import yaml

    config = yaml.safe_load((data / "run" / "config.yaml").read_text())
    assert config["objective"] == "neuron:lm.0:1" and config["scales"]["main"] == 0.0 and config["scales"]["lm"] == 1.0
    row = json.loads((data / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert "lm" in row["terms"] and "main" not in row["terms"]


# -- bad input ---------------------------------------------------------------------------------

def test_capture_bad_inputs(tiny_checkpoint, data):
    assert_user_error(capture(tiny_checkpoint, "f", "--site", "lm.9", "--tokens", "image"), "has no site 'lm.9'")
    assert_user_error(capture(tiny_checkpoint, "f", "--site", "lm.1", "--tokens", "word:zebra"), "empty selection")
    assert_user_error(capture(tiny_checkpoint, "f", "--site", "lm.1", "--tokens", "middle"), "--tokens must be one of")
    (data / "data.jsonl").write_text('{"image": 3}\n')
    assert_user_error(capture(tiny_checkpoint, "f", "--site", "lm.1", "--tokens", "image"), 'needs an "image" path')
    assert not list(data.glob("f*"))


def test_analysis_bad_inputs(tiny_checkpoint, data):
    assert capture(tiny_checkpoint, "last", "--site", "lm.1", "--tokens", "last-prompt").exit_code == 0
    assert_user_error(invoke("concepts", "fit", "--features", "last", "--k", "7", "--out", "c", "--no-words"),
                      "K=7 concepts need at least 7 samples")
    assert not list(data.glob("c*"))
    ok("concepts", "fit", "--features", "last", "--k", "2", "--out", "c", "--no-words")

    # the same features, as if captured from another model
    (data / "other").mkdir()
    for name in ("index.jsonl", "shard-00000.safetensors"):
        (data / "other" / name).write_bytes((data / "last" / name).read_bytes())
    meta = json.loads((data / "last" / "meta.json").read_text())
    (data / "other" / "meta.json").write_text(json.dumps({**meta, "model": "qwen2-vl"}))
    assert_user_error(invoke("concepts", "project", "--concepts", "c", "--features", "other"),
                      "fitted on model 'llava-llama3'")
    assert_user_error(invoke("steer", "build", "--base", "last", "--target", "other", "--out", "v.safetensors"),
                      "has model 'llava-llama3'")
    ok("steer", "build", "--base", "last", "--target", "last", "--out", "v.safetensors")
    qwen_vector = ["steer", "apply", "--model", "qwen2-vl", "--checkpoint", tiny_checkpoint, "--vector", "v.safetensors",
                   "--images", "images"]
    assert_user_error(invoke(*qwen_vector), "holds a llava model, not qwen2_vl")
    ok("steer", "build", "--base", "other", "--target", "other", "--out", "qwen.safetensors")
    assert_user_error(invoke("steer", "apply", "--model", "llava-llama3", "--checkpoint", tiny_checkpoint, "--vector",
                             "qwen.safetensors", "--images", "images"), "was made with model 'qwen2-vl', not 'llava-llama3'")
    assert_user_error(invoke("steer", "apply", "--model", "llava-llama3", "--checkpoint", tiny_checkpoint, "--vector",
                             "v.safetensors", "--images", "images", "--positions", "later"), "positions must be")
    assert not list(data.glob("v.safetensors.partial"))

    (data / "broken").mkdir()
    (data / "broken" / "meta.json").write_text("{not json")
    assert_user_error(invoke("concepts", "fit", "--features", "broken", "--no-words"), "meta.json' is not valid JSON")
    assert_user_error(invoke("shift", "--original", "last", "--finetuned", "images", "--no-words"),
                      "is not a features folder")
    (data / "junk.safetensors").write_text("junk")
    assert_user_error(invoke("steer", "apply", "--model", "llava-llama3", "--checkpoint", tiny_checkpoint,
                             "--vector", "junk.safetensors", "--images", "images"), "is not a steering vector file")


def test_invert_objective_bad_inputs(tiny_checkpoint, data):
    assert capture(tiny_checkpoint, "last", "--site", "lm.1", "--tokens", "last-prompt").exit_code == 0
    ok("concepts", "fit", "--features", "last", "--k", "2", "--out", "c", "--no-words")
    base = ["invert", "--model", "llava-llama3", "--checkpoint", tiny_checkpoint, "--feature-loss-scale", "0",
            "--iterations", "2", "--batch-size", "1", "--quiet", *QUESTION, "--answer", "red", "--outputs", "run"]
    assert_user_error(invoke(*base, "--objective", "concept:c:5"), "has concepts 0..1, not 5")
    assert_user_error(invoke(*base, "--objective", "concept:c"), "needs a concept number K")
    assert_user_error(invoke(*base, "--objective", "neuron:lm.4:0"), "has no site 'lm.4'")
    assert_user_error(invoke(*base, "--objective", "neuron:lm.1:64"), "units 0..63")
    assert_user_error(invoke(*base, "--objective", "ring:x"), "--objective must be")
    assert_user_error(invoke(*base, "--objective", "neuron:lm.1:0", "--objective-positions", "end"),
                      "objective-positions must be")
    assert_user_error(invoke(*base, "--scale", "lm=1"), "the lm term needs --objective")
    assert not list(data.glob("run*"))
