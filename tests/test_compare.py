"""`mimic compare` on the three tiny models: one folder with a run per model, a labelled grid, a
transfer matrix, a report; a model that fails is reported and the others complete."""
import json

import pytest
import yaml
from typer.testing import CliRunner

from mimic_toolkit.cli import app


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    from mimic_plugins.idefics2.adapter import Idefics2Adapter
    from mimic_plugins.qwen2_vl.adapter import Qwen2VLAdapter

    folders = {}
    for name, cls in (("qwen2-vl", Qwen2VLAdapter), ("idefics2", Idefics2Adapter)):
        folders[name] = tmp_path_factory.mktemp(name)
        cls.tiny().save(folders[name])
    return folders


@pytest.mark.slow
def test_compare_three_tiny_models_and_a_failing_one(tiny_checkpoint, tiny_checkpoints, in_tmp):
    (in_tmp / "corrupt").mkdir()
    (in_tmp / "corrupt" / "config.json").write_text("{ not json")  # found, but fails when loaded
    args = ["compare", "--models", "llava-llama3,qwen2-vl,idefics2,toy-shapes", "--outputs", "cmp",
            "--checkpoint", f"llava-llama3={tiny_checkpoint}", "--checkpoint", f"qwen2-vl={tiny_checkpoints['qwen2-vl']}",
            "--checkpoint", f"idefics2={tiny_checkpoints['idefics2']}", "--checkpoint", "toy-shapes=corrupt",
            "--question", "What is in the image?", "--answer", "a red circle", "--iterations", "2",
            "--batch-size", "1", "--scale", "feature=0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output  # the comparison completes, and says a model failed
    assert result.stderr.strip().splitlines()[-1] == "failed: toy-shapes (see the report)"
    folder = in_tmp / "cmp"
    data = json.loads((folder / "comparison.json").read_text())
    assert "could not read the model config" in data["models"]["toy-shapes"]["error"]
    ok = ["llava-llama3", "qwen2-vl", "idefics2"]
    for model in ok:
        assert (folder / model / "report.html").is_file() and "error" not in data["models"][model]
    pairs = {(t["inverted_by"], t["scored_by"]) for t in data["transfer"]}
    assert pairs == {(a, b) for a in ok for b in ok}
    assert all(0 <= t["p_target"] <= 1 and 0 <= t["names_target"] <= 1 for t in data["transfer"])
    assert (folder / "grid.png").is_file() and "Transfer" in (folder / "report.html").read_text()
    assert not (in_tmp / "cmp.partial").exists()


def test_missing_inputs_of_every_model_are_named_at_once_before_any_work(tiny_checkpoint, in_tmp):
    args = ["compare", "--models", "llava-llama3,qwen2-vl", "--outputs", "cmp", "--question", "What is in the image?",
            "--answer", "a red circle", "--iterations", "2", "--checkpoint", f"llava-llama3={tiny_checkpoint}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error:")
    # the same policy as `mimic invert`: missing statistics are an error, not a silently weaker objective
    assert "llava-llama3: the feature-statistics term needs --stats" in line
    assert "qwen2-vl: the feature-statistics term needs --stats" in line and "qwen2-vl' needs --checkpoint" in line
    assert not (in_tmp / "cmp").exists() and not (in_tmp / "cmp.partial").exists()


TWO = ["compare", "--models", "toy-shapes,llava-llama3", "--outputs", "cmp", "--question", "What is in the image?",
       "--answer", "a red circle", "--iterations", "2", "--batch-size", "1", "--scale", "feature=0"]


def two(tiny_checkpoint, *more):
    return CliRunner().invoke(app, [*TWO, "--checkpoint", f"llava-llama3={tiny_checkpoint}", *more])


def failing_for(model, exc, original):
    def call(registry, name, config, *args):
        if name == model:
            raise exc
        return original(registry, name, config, *args)
    return call


@pytest.mark.parametrize("exc", [ValueError("bad header"), KeyError("weight")])
def test_any_failure_of_one_model_leaves_the_others(tiny_checkpoint, in_tmp, monkeypatch, exc):
    import mimic_toolkit.compare as compare

    monkeypatch.setattr(compare, "_run_model", failing_for("llava-llama3", exc, compare._run_model))
    result = two(tiny_checkpoint)
    assert result.exit_code == 1, result.output
    data = json.loads((in_tmp / "cmp" / "comparison.json").read_text())
    assert data["models"]["llava-llama3"]["error"].startswith(type(exc).__name__)
    assert "error" not in data["models"]["toy-shapes"] and (in_tmp / "cmp" / "toy-shapes" / "report.html").is_file()
    assert result.stderr.strip().splitlines()[-1] == "failed: llava-llama3 (see the report)"


def test_a_rerun_after_a_stopped_comparison_keeps_the_finished_runs(tiny_checkpoint, in_tmp, monkeypatch):
    import mimic_toolkit.compare as compare

    original = compare._run_model
    monkeypatch.setattr(compare, "_run_model", failing_for("llava-llama3", KeyboardInterrupt(), original))
    assert two(tiny_checkpoint).exit_code != 0  # Ctrl-C stops the whole comparison
    kept = (in_tmp / "cmp.partial" / "toy-shapes" / "images" / "00.png").read_bytes()
    monkeypatch.setattr(compare, "_run_model", original)
    result = two(tiny_checkpoint)
    assert result.exit_code == 0, result.output
    assert "toy-shapes: finished earlier, kept" in result.stderr
    assert (in_tmp / "cmp" / "toy-shapes" / "images" / "00.png").read_bytes() == kept
    assert len(json.loads((in_tmp / "cmp" / "comparison.json").read_text())["transfer"]) == 4


def test_a_judge_that_fails_is_noted_and_the_others_score(tiny_checkpoint, in_tmp, monkeypatch):
    import mimic_toolkit.compare as compare

    original = compare.concept_of
    monkeypatch.setattr(compare, "concept_of", lambda config, spec: (_ for _ in ()).throw(KeyError("lm_head"))
                        if spec.id == "llava-llama3" else original(config, spec))
    result = two(tiny_checkpoint)
    assert result.exit_code == 1, result.output
    data = json.loads((in_tmp / "cmp" / "comparison.json").read_text())
    assert data["models"]["llava-llama3"]["scoring_error"] == "KeyError: 'lm_head'"
    assert {(t["inverted_by"], t["scored_by"]) for t in data["transfer"]} == {
        ("toy-shapes", "toy-shapes"), ("llava-llama3", "toy-shapes")}
    assert "scoring failed: KeyError" in (in_tmp / "cmp" / "report.html").read_text()


def test_a_kept_run_of_other_settings_is_refused_not_removed(tiny_checkpoint, in_tmp):
    run = in_tmp / "cmp.partial" / "toy-shapes"
    result = CliRunner().invoke(app, ["invert", "--iterations", "3", "--batch-size", "1", "--scale", "feature=0",
                                      "--question", "What is in the image?", "--answer", "a red circle",
                                      "--outputs", run, "--quiet"])
    assert result.exit_code == 0, result.output
    before = (run / "checkpoint.safetensors").read_bytes()
    result = two(tiny_checkpoint)
    assert result.exit_code == 1, result.output
    error = json.loads((in_tmp / "cmp" / "comparison.json").read_text())["models"]["toy-shapes"]["error"]
    assert "made with other settings (iterations" in error and "remove it to run the model again" in error
    assert (in_tmp / "cmp" / "toy-shapes" / "checkpoint.safetensors").read_bytes() == before
    assert yaml.safe_load((in_tmp / "cmp" / "toy-shapes" / "config.yaml").read_text())["iterations"] == 3


def test_a_rerun_resumes_an_interrupted_model_run(tiny_checkpoint, in_tmp):
    from mimic_toolkit.registry import build_registry
    from mimic_toolkit.session import Interrupted, build_config, run_inversion

    registry = build_registry()
    config = build_config(registry, {"model": "toy-shapes", "question": "What is in the image?", "answer": "a red circle",
                                     "iterations": 2, "batch_size": 1, "scales": {"feature": 0.0},
                                     "outputs": str(in_tmp / "cmp.partial" / "toy-shapes")})
    with pytest.raises(Interrupted):
        run_inversion(registry, config, stop_requested=lambda: True)  # stops after step 1
    result = two(tiny_checkpoint)
    assert result.exit_code == 0, result.output
    assert "toy-shapes: resuming" in result.stderr
    steps = [json.loads(line)["step"] for line in (in_tmp / "cmp" / "toy-shapes" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
