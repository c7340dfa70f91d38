"""What a new user meets first: the CLI's conventions (-h, --version, -v, defaults in --help,
--json), progress a log file can show, reusable run configs, a direct question answered with the
right statistics, sweeps that refuse other settings, and reports that say what was run."""
import io
import json
import os

import pytest
import yaml
from typer.testing import CliRunner

from mimic_toolkit.cli import app
from mimic_toolkit.live import PlainProgress, progress_display, render

runner = CliRunner()
FAST = ["--iterations", "3", "--batch-size", "1", "--log-every", "1", "--grid-every", "2"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_version_short_help_and_defaults_in_help():
    from mimic_toolkit import __version__

    assert invoke("--version").stdout.strip() == f"mimic-toolkit {__version__}"
    short = runner.invoke(app, ["invert", "-h"], env={"COLUMNS": "200"})
    assert short.exit_code == 0 and "--iterations" in short.stdout
    assert "Optimisation steps. (default: 5000)" in short.stdout


def test_off_a_terminal_progress_is_plain_lines_and_the_panel_title_fits_80_columns():
    assert isinstance(progress_display(stream=io.StringIO()), PlainProgress)
    assert progress_display(quiet=True) is None
    out = io.StringIO()
    progress = PlainProgress(out, every_s=3600)
    event = {"step": 1, "iterations": 5000, "first_step": 0, "elapsed_s": 0.5, "loss": 2.5, "terms": {"main": 2.5},
             "lr": 0.3, "grad_norm": 1.0, "target_tokens": ["a", "red"], "p_target": [0.9, 0.2],
             "top5": [[["a", 0.9]], [["blue", 0.7]]], "p_answer": 0.18}
    progress.update(event)
    progress.update({**event, "step": 2})  # within the interval: not printed
    progress.update({**event, "step": 5000})  # the last step always is
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("step 1/5000") and "P(red)=0.200" in lines[0]
    assert lines[1].startswith("step 5000/5000")
    from rich.console import Console

    console = Console(width=80, file=io.StringIO())
    console.print(render(event))
    assert console.file.getvalue().splitlines()[0].strip().startswith("mimic invert  step 1/5000")  # one line


def test_invert_off_a_terminal_prints_progress_and_a_json_summary(in_tmp):
    result = invoke("invert", *FAST, "--outputs", "run", "--json")
    assert result.exit_code == 0, result.output
    assert "step 1/3" in result.stderr and "step 3/3" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["run_folder"] == "run" and summary["steps"] == 3
    assert list(summary["p_target"]) == ["a", "red", "circle"]
    assert set(summary["verdicts"]) == {"verifier: shape", "verifier: colour", "verifier: both"}


def test_a_run_config_is_reusable_from_another_folder_and_the_manifest_names_its_inputs(in_tmp):
    stats = in_tmp / "mystats"
    assert invoke("toy", "images", "--out", "red-circles", "--n", "4", "--class-index", "0").exit_code == 0
    made = invoke("stats", "--images", "red-circles", "--class-index", "0", "--out", stats)
    assert made.exit_code == 0, made.output
    assert invoke("invert", *FAST, "--outputs", "first", "--stats", "mystats", "--quiet").exit_code == 0
    config = yaml.safe_load((in_tmp / "first" / "config.yaml").read_text())
    assert "outputs" not in config and config["stats"] == str(stats.resolve())
    manifest = json.loads((in_tmp / "first" / "manifest.json").read_text())
    assert manifest["checkpoint"] and os.path.isdir(manifest["checkpoint"])  # the bundled model's folder
    (stats_file,) = stats.iterdir()
    assert manifest["stats"]["path"] == str(stats_file.resolve()) and len(manifest["stats"]["sha256"]) == 64
    elsewhere = in_tmp / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    again = invoke("invert", "--config", in_tmp / "first" / "config.yaml", "--outputs", "second", "--quiet")
    assert again.exit_code == 0, again.output
    assert (elsewhere / "second" / "images").is_dir()
    report = (in_tmp / "first" / "report.html").read_text()
    for fragment in ("P(red)", "P(circle)", "verifier: both", "sha256", "step 2", "feature 0.01"):
        assert fragment in report, fragment


def test_a_direct_answer_that_is_a_concept_uses_its_statistics_and_another_runs_without(in_tmp):
    concept = invoke("invert", *FAST, "--outputs", "concept", "--question", "What is in the image?",
                     "--answer", "A red circle", "--quiet")
    assert concept.exit_code == 0, concept.output
    manifest = json.loads((in_tmp / "concept" / "manifest.json").read_text())
    assert manifest["concept"]["class_index"] == 0 and "toy-shapes-c0-" in manifest["stats"]["path"]
    word = invoke("invert", *FAST, "--outputs", "word", "--question", "What colour is the shape?", "--answer", "red",
                  "--quiet")
    assert word.exit_code == 0, word.output
    assert "running without the feature-statistics term" in word.stderr
    assert yaml.safe_load((in_tmp / "word" / "config.yaml").read_text())["scales"]["feature"] == 0.0


def test_inputs_that_can_be_checked_are_checked_before_the_model_loads(in_tmp, monkeypatch):
    import mimic_toolkit.session as session

    monkeypatch.setattr(session, "load_configured", lambda *a, **k: pytest.fail("the model was loaded"))
    jitter = invoke("invert", *FAST, "--jitter", "64")
    assert jitter.exit_code == 2 and "jitter must be smaller than the image side 64" in jitter.stderr
    sites = invoke("invert", *FAST, "--feature-sites", "vision.layers.9.mlp")
    assert sites.exit_code == 2 and "names no site of this model" in sites.stderr
    assert not list(in_tmp.iterdir())


def test_verbose_says_what_was_loaded(in_tmp):
    result = invoke("-v", "invert", *FAST, "--outputs", "run", "--quiet")
    assert result.exit_code == 0, result.output
    assert "loaded toy-shapes from" in result.stderr
    quiet = invoke("invert", *FAST, "--outputs", "run2", "--quiet")  # the next command, same process
    assert quiet.exit_code == 0 and "loaded" not in quiet.stderr


def test_a_sweep_rerun_with_other_settings_is_refused_and_its_index_is_in_class_order(in_tmp):
    args = ["sweep", "--outputs", "sw", "--classes", "2,10,1", "--iterations", "2", "--batch-size", "1", "--quiet"]
    assert invoke(*args).exit_code == 0
    index = (in_tmp / "sw" / "index.html").read_text()
    assert index.index(">1<") < index.index(">2<") < index.index(">10<") and "red circle" not in index
    assert "green circle" in index  # class 1, named
    other = invoke(*args[:-5], "--iterations", "3", "--batch-size", "1", "--quiet")
    assert other.exit_code == 2 and "iterations=2, not 3" in other.stderr
    summary = json.loads(invoke(*args, "--json").stdout)
    assert [run["concept"]["class_index"] for run in summary["runs"]] == [1, 2, 10]


def test_toy_images_and_dataset_make_new_folders_only(in_tmp):
    made = invoke("toy", "dataset", "--out", "shapes", "--n", "3", "--kind", "colour")
    assert made.exit_code == 0, made.output
    rows = [json.loads(line) for line in (in_tmp / "shapes" / "dataset.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["answer"] == r["labels"]["colour"] for r in rows)
    assert all((in_tmp / "shapes" / r["image"]).is_file() for r in rows)
    again = invoke("toy", "dataset", "--out", "shapes", "--n", "3")
    assert again.exit_code == 2 and "already exists" in again.stderr
    bad = invoke("toy", "images", "--out", "x", "--class-index", "24")
    assert bad.exit_code == 2 and not (in_tmp / "x").exists()


@pytest.mark.parametrize("command", [
    ["steer", "apply", "--vector", "v.safetensors", "--images", "imgs", "--out", "taken"],
    ["capture", "--images", "imgs", "--site", "lm.1", "--tokens", "image", "--out", "taken"],
    ["steer", "build", "--base", "a", "--target", "b", "--out", "taken"],
])
def test_an_existing_output_is_refused_before_the_model_loads(in_tmp, monkeypatch, command):
    import mimic_toolkit.engine as engine

    monkeypatch.setattr(engine, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (in_tmp / "imgs").mkdir()
    assert invoke("toy", "images", "--out", "imgs/red", "--n", "1").exit_code == 0
    (in_tmp / "taken").write_text("kept")
    result = invoke(*command)
    assert result.exit_code == 2 and "'taken' already exists" in result.stderr, result.output
    assert (in_tmp / "taken").read_text() == "kept"


def test_compare_ends_with_a_json_summary(tiny_checkpoint, in_tmp):
    result = invoke("compare", "--models", "toy-shapes,llava-llama3", "--checkpoint", f"llava-llama3={tiny_checkpoint}",
                    "--scale", "feature=0", "--iterations", "2", "--batch-size", "1", "--outputs", "cmp", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["comparison_folder"] == "cmp" and set(summary["models"]) == {"toy-shapes", "llava-llama3"}
    assert json.loads((in_tmp / "cmp" / "comparison.json").read_text())["models"] == summary["models"]
