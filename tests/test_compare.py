"""`mimic compare` on the three tiny models: one folder with a run per model, a labelled grid, a
transfer matrix, a report; a model that fails is reported and the others complete."""
import json

import pytest
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
    assert result.exit_code == 0, result.output
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
