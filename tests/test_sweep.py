"""`mimic sweep`: shards split the classes, a restarted shard skips finished classes and resumes
the interrupted one, and an index links every report."""
import json

import pytest
from typer.testing import CliRunner

from mimic_toolkit.cli import app
from mimic_toolkit.errors import UserError
from mimic_toolkit.registry import build_registry
from mimic_toolkit.session import Interrupted, build_config
from mimic_toolkit.sweep import parse_shard, run_sweep, shard_classes


def test_shards_split_the_classes_without_overlap():
    classes = [932, 1, 207, 292, 340]
    parts = [shard_classes(classes, None, (i, 2)) for i in range(2)]
    assert parts == [[1, 292, 932], [207, 340]]
    assert shard_classes(classes, [340, 1], (0, 1)) == [1, 340]
    with pytest.raises(UserError, match="class index 5 is not in"):
        shard_classes(classes, [5], (0, 1))
    with pytest.raises(UserError, match="i/n"):
        parse_shard("2/2")


def test_a_restarted_shard_skips_finished_classes_and_resumes_the_interrupted_one(tiny_checkpoint, in_tmp):
    registry = build_registry()
    settings = build_config(registry, {"model": "llava-llama3", "checkpoint": str(tiny_checkpoint), "iterations": 4, "batch_size": 1,
                                       "checkpoint_every": 2, "scales": {"feature": 0.0}})
    folder = in_tmp / "sweep"
    calls = []

    def stop_in_second_class():
        calls.append(1)
        return len(calls) == 6  # class 1: steps 1-4; class 207: stop after step 2

    with pytest.raises(Interrupted):
        run_sweep(registry, settings, folder, [1, 207], (0, 1), stop_requested=stop_in_second_class, say=lambda m: None)
    assert (folder / "c1" / "report.html").is_file() and (folder / "c207.partial" / "checkpoint.safetensors").is_file()

    said = []
    done = run_sweep(registry, settings, folder, [1, 207], (0, 1), say=said.append)
    assert said == ["class 1: finished earlier, skipped", "class 207: resuming"]
    assert [p.name for p in done] == ["c1", "c207"]
    steps = [json.loads(line)["step"] for line in (folder / "c207" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 4]  # logged at the first and last step, once each
    index = (folder / "index.html").read_text()
    assert "c1/report.html" in index and "c207/report.html" in index


def test_sweep_command_runs_a_shard(tiny_checkpoint, in_tmp):
    result = CliRunner().invoke(app, ["sweep", "--outputs", "sw", "--model", "llava-llama3", "--checkpoint", str(tiny_checkpoint),
                                      "--classes", "1,207,292", "--shard", "1/2", "--iterations", "2",
                                      "--batch-size", "1", "--scale", "feature=0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (in_tmp / "sw").iterdir()) == ["c207", "index.html"]
