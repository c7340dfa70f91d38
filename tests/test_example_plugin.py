"""examples/adapter-plugin is a working third-party plugin: pip-installed (into a temporary folder),
mimic lists its model, and an inversion runs through it without any change to the toolkit."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mimic_toolkit.engine import format_prompt, load_model
from mimic_toolkit.registry import build_registry
from mimic_toolkit.session import build_config, run_inversion

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "adapter-plugin"


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """The example installed with pip into its own folder; a Python with that folder on its path
    finds the plugin the way it finds any installed one: by its entry point."""
    source = tmp_path_factory.mktemp("source") / "adapter-plugin"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(target), str(source)], check=True)
    return target


def test_mimic_models_lists_the_installed_plugins_model(installed_plugin):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed_plugin), os.environ.get("PYTHONPATH", "")])}
    code = "from mimic_toolkit.cli import main; main()"
    out = subprocess.run([sys.executable, "-c", code, "models", "--json"], env=env, capture_output=True,
                         text=True, check=True)
    models = {m["id"]: m for m in json.loads(out.stdout)}
    assert models["llava-1.5-7b"]["plugin"] == "llava15"
    assert models["llava-1.5-7b"]["tested_transformers"]
    assert "llava-llama3" in models  # the built-ins are still there


def test_a_tiny_inversion_runs_through_the_installed_plugin(installed_plugin, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(installed_plugin))
    registry = build_registry()
    adapter_class = registry.adapter_spec("llava-1.5-7b").load_class()
    adapter_class.tiny().save(tmp_path / "checkpoint")
    flags = dict(model="llava-1.5-7b", checkpoint=str(tmp_path / "checkpoint"), question="What is in the image?",
                 answer="a red circle", iterations=3, batch_size=1, jitter=0, device="cpu",
                 scales={"feature": 0.0}, outputs=str(tmp_path / "run"))
    run = run_inversion(registry, build_config(registry, flags))
    manifest = json.loads((run / "manifest.json").read_text())
    # the plugin is data: the built-in adapter, its own chat format through the prompt hook
    assert (manifest["model"], manifest["adapter"], manifest["plugin"]) == ("llava-1.5-7b", "LlavaLlama3Adapter", "llava15")
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in steps] == [1, 3] and steps[-1]["terms"]["main"] > 0
    assert (run / "images" / "00.png").is_file() and (run / "report.html").is_file()
    from mimic_llava15 import VICUNA_TEMPLATE

    adapter = load_model("llava-1.5-7b", checkpoint=str(tmp_path / "checkpoint"), device="cpu", registry=registry)
    turns = [("What is in the image?", "a red circle")]
    assert format_prompt(adapter, turns).input_ids.tolist() == \
        adapter.build_prompt(turns, chat_template=VICUNA_TEMPLATE).input_ids.tolist()


def test_the_plugins_own_tests_pass_against_the_installed_plugin(installed_plugin, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed_plugin), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                             str(EXAMPLE / "tests")], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "3 passed" in result.stdout
