"""The CLI through typer's runner: the main job works, and every bad input is one clear line,
exit code 2, no traceback, and no run folder left behind."""
import json

import pytest
from typer.testing import CliRunner

from mimic_toolkit.cli import app

runner = CliRunner()
FAST = ["--iterations", "4", "--batch-size", "1", "--jitter", "1", "--log-every", "2", "--quiet"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, fragment):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]


@pytest.fixture
def invert_args(tiny_checkpoint):
    return ["invert", "--model", "llava-llama3", "--checkpoint", tiny_checkpoint, "--feature-loss-scale", "0", *FAST]


def test_invert_writes_a_complete_run_folder_and_says_where(invert_args, in_tmp):
    result = invoke(*invert_args, "--question", "What is in the image?", "--answer", "a red circle",
                    "--outputs", "run")
    assert result.exit_code == 0, result.output
    assert "run folder: run" in result.output and (in_tmp / "run" / "report.html").is_file()
    rows = [json.loads(line) for line in (in_tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 4]


def test_config_file_sets_knobs_and_flags_override_it(invert_args, in_tmp):
    (in_tmp / "run.yaml").write_text("iterations: 3\nbatch-size: 2\nlr: 0.05\nscales: {tv_l1: 0.0}\n")
    result = invoke(*invert_args, "--config", "run.yaml", "--iterations", "2", "--class-index", "932",
                    "--outputs", "run")
    assert result.exit_code == 0, result.output
    import yaml

    saved = yaml.safe_load((in_tmp / "run" / "config.yaml").read_text())
    assert saved["iterations"] == 2 and saved["lr"] == 0.05 and saved["batch_size"] == 1  # flags win
    assert saved["scales"]["tv_l1"] == 0.0 and saved["scales"]["feature"] == 0.0
    assert saved["scales"]["main"] == 0.005  # the adapter's default
    manifest = json.loads((in_tmp / "run" / "manifest.json").read_text())
    assert manifest["concept"]["target"] == "Pretzel"  # from the bundled ImageNet prompts


def test_models_json_and_plugins():
    models = json.loads(invoke("models", "--json").output)
    llava = next(m for m in models if m["id"] == "llava-llama3")
    assert llava["plugin"] == "llava_llama3" and llava["resolution"] == 336
    assert llava["defaults"] == {}  # the core's defaults are the reference's LLaVA settings
    toy = next(m for m in models if m["id"] == "toy-shapes")
    assert toy["defaults"]["lr"] == 0.04 and toy["defaults"]["parameterisation"] == "fourier:1.5"  # only what differs
    plugins = invoke("plugins").output
    assert "llava_llama3: register_adapters" in plugins
    core = next(line for line in plugins.splitlines() if line.startswith("core:"))
    for hook in ("mimic_load_model", "mimic_vision_sites", "mimic_format_prompt"):
        assert f"{hook} (default)" in core  # the engine's default answers, listed like any plugin's


def test_stats_command_writes_a_file(tiny_checkpoint, in_tmp):
    from PIL import Image

    (in_tmp / "imgs").mkdir()
    Image.new("RGB", (32, 32), "red").save(in_tmp / "imgs" / "a.png")
    result = invoke("stats", "--model", "llava-llama3", "--checkpoint", tiny_checkpoint, "--images", "imgs",
                    "--out", "st")
    assert result.exit_code == 0, result.output
    assert "1 images, 3 sites" in result.output and len(list((in_tmp / "st").iterdir())) == 1


# -- bad input ---------------------------------------------------------------------------------

def test_unknown_model_suggests_the_closest(in_tmp):
    assert_user_error(invoke("invert", "--model", "llava-lama3"), "did you mean 'llava-llama3'")


def test_missing_and_non_model_checkpoints(in_tmp):
    assert_user_error(invoke("invert", "--checkpoint", "nowhere", "--feature-loss-scale", "0", *FAST),
                      "checkpoint folder 'nowhere' does not exist")
    (in_tmp / "empty").mkdir()
    assert_user_error(invoke("invert", "--checkpoint", "empty", "--feature-loss-scale", "0", *FAST),
                      "empty' is not a model folder")
    assert not (in_tmp / "runs").exists()


def test_malformed_prompt_file_names_entry_and_field(invert_args, in_tmp):
    (in_tmp / "p.json").write_text(json.dumps([
        {"class_index": 1, "class_name": "a", "chat_sequence": [["q?", "a"]]},
        {"class_index": 2, "class_name": "b"}]))
    assert_user_error(invoke(*invert_args, "--prompts", "p.json"), "entry 1: missing field 'chat_sequence'")
    (in_tmp / "p.json").write_text("[{not json")
    assert_user_error(invoke(*invert_args, "--prompts", "p.json"), "is not valid JSON")


def test_class_index_not_in_the_prompt_file(invert_args, in_tmp):
    assert_user_error(invoke(*invert_args, "--class-index", "12345"), "class index 12345 is not in")


def test_statistics_of_another_model_are_refused(invert_args, tiny_llava, in_tmp):
    from PIL import Image

    from mimic_toolkit.features import compute_stats

    (in_tmp / "imgs").mkdir()
    Image.new("RGB", (32, 32), "red").save(in_tmp / "imgs" / "a.png")
    stats = compute_stats(tiny_llava, "llava-llama3", in_tmp / "imgs")
    stats.meta["model"] = "qwen2-vl"
    path = stats.save(in_tmp)
    args = [a if a != "0" else "0.1" for a in invert_args]  # feature term on
    assert_user_error(invoke(*args, "--stats", path, "--outputs", "run"), "computed for model 'qwen2-vl'")
    assert not (in_tmp / "run").exists() and not (in_tmp / "run.partial").exists()


def test_feature_term_without_statistics_says_how_to_fix_it(tiny_checkpoint, in_tmp):
    assert_user_error(invoke("invert", "--model", "llava-llama3", "--checkpoint", tiny_checkpoint, *FAST),
                      "needs --stats FILE")


def test_image_folder_without_images(tiny_checkpoint, in_tmp):
    (in_tmp / "imgs").mkdir()
    assert_user_error(invoke("stats", "--checkpoint", tiny_checkpoint, "--images", "imgs"), "has no images")


def test_resolution_not_divisible_by_the_patch_size(invert_args, in_tmp):
    assert_user_error(invoke(*invert_args, "--resolution", "30", "--outputs", "run"), "not a multiple of the patch size 8")
    assert_user_error(invoke(*invert_args, "--resolution", "64", "--outputs", "run"), "takes 32 px")
    assert not (in_tmp / "run.partial").exists()


def test_bad_config_files_and_settings(invert_args, in_tmp):
    (in_tmp / "a.yaml").write_text("iterations: [1\n")
    assert_user_error(invoke(*invert_args, "--config", "a.yaml"), "is not valid YAML")
    (in_tmp / "b.yaml").write_text("iteratons: 3\n")
    assert_user_error(invoke(*invert_args, "--config", "b.yaml"), "unknown setting 'iteratons'")
    assert_user_error(invoke(*invert_args, "--scale", "sharpness=1"), "unknown objective term 'sharpness'")
    assert_user_error(invoke(*invert_args, "--lr", "-1"), "lr > 0")
    assert_user_error(invoke(*invert_args, "--memory-saving", "all"), "memory-saving must be one of off, selective, layers")


def test_existing_output_folder_is_not_overwritten(invert_args, in_tmp):
    (in_tmp / "run").mkdir()
    (in_tmp / "run" / "keep.txt").write_text("mine")
    assert_user_error(invoke(*invert_args, "--outputs", "run"), "already exists")
    assert (in_tmp / "run" / "keep.txt").read_text() == "mine"


def test_resume_with_another_config_is_refused(invert_args, in_tmp):
    from mimic_toolkit.registry import build_registry
    from mimic_toolkit.session import Interrupted, build_config, run_inversion

    registry = build_registry()
    config = build_config(registry, {"model": "llava-llama3", "checkpoint": str(invert_args[4]), "iterations": 6, "batch_size": 1,
                                     "outputs": "run", "scales": {"feature": 0.0}})
    with pytest.raises(Interrupted):
        run_inversion(registry, config, stop_requested=lambda: True)
    assert_user_error(invoke("invert", "--resume", "run.partial", "--iterations", "9"),
                      "was made with iterations=6, not 9")
    assert_user_error(invoke("invert", "--resume", "elsewhere"), "resume folder 'elsewhere' does not exist")
    result = invoke("invert", "--resume", "run.partial", "--memory-saving", "selective", "--quiet")  # how, not what
    assert result.exit_code == 0, result.output
    assert (in_tmp / "run" / "report.html").is_file()


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tiny_checkpoint, in_tmp):
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "mimic_toolkit", "invert", "--checkpoint", str(tiny_checkpoint),
           "--question", "What is in the image?", "--answer", "a red circle", "--iterations", "100000",
           "--batch-size", "1", "--feature-loss-scale", "0", "--log-every", "1", "--outputs", "run", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = in_tmp / "run.partial" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Continue with: mimic invert --resume run.partial" in err and "Traceback" not in err
    from safetensors import safe_open

    assert int(safe_open(in_tmp / "run.partial" / "checkpoint.safetensors", "pt").metadata()["step"]) >= 3


def test_every_setting_is_a_documented_flag_of_invert():
    """InversionConfig's fields are the one definition of the settings: a new one is a flag at once."""
    from dataclasses import MISSING, fields

    import typer.main

    from mimic_toolkit.config import InversionConfig

    params = {p.name: p for p in typer.main.get_command(app).commands["invert"].params}
    for f in fields(InversionConfig):
        assert f.metadata.get("help"), f"setting '{f.name}' has no help (declare it with config.setting)"
        if f.metadata["flag"]:
            assert f"--{f.name.replace('_', '-')}" in params[f.name].opts, f.name
            assert params[f.name].help.startswith(f.metadata["help"])
            if f.default not in (None, MISSING):  # the default is shown, as the field declares it
                shown = f.name.replace("_", "-") if f.default is True else None if f.default is False else f.default
                assert f"(default: {shown if shown is not None else 'no-' + f.name.replace('_', '-')})" in \
                    params[f.name].help, f.name
    assert "-m" in params["model"].opts and params["flip"].secondary_opts == ["--no-flip"]
