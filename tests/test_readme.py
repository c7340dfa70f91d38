"""Every `mimic` command in the README runs as written, in the README's order, in one empty
folder (so an example's inputs are made by the examples before it), on the bundled toy models.

Left out, each for a stated reason: commands on real checkpoints (a `/models/...` path) or on a
user's downloads (`~/...`), shell variables (Slurm and GPU loops), and the toy trainings (tens of
CPU minutes: `toy train*`). Cut short: inversions run 2 steps of 1 image, a comparison 2 concepts,
SAE and ICL trainings 20 steps (the README's step counts are for results, not for a test);
everything else runs exactly as printed."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TOO_LONG = ("toy train", "toy train-icl", "toy train-verifier", "toy stats")
STEPS = ["--iterations", "2", "--batch-size", "1"]
SHORT = {"invert": STEPS, "sweep": STEPS, "compare": STEPS + ["--classes", "0,1"], "sae train": ["--steps", "20"],
         "sae layers": ["--steps", "20"], "icl train": ["--steps", "20"]}


def readme_commands() -> list[list[str]]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] != ["mimic"] or any("/models/" in w or "$" in w or w.startswith("~") for w in words):
                continue
            if " ".join(words[1:3]).startswith(TOO_LONG):
                continue
            commands.append(words)
    return commands


def test_the_readme_has_runnable_examples():
    commands = {c[1] for c in readme_commands()}
    assert {"invert", "stats", "capture", "concepts", "steer", "compare"} <= commands, commands


@pytest.mark.slow
def test_every_readme_example_runs_as_written(tmp_path):
    for words in readme_commands():
        args = words[1:] + SHORT.get(" ".join(words[1:3]), SHORT.get(words[1], []))
        done = subprocess.run([sys.executable, "-m", "mimic_toolkit", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, f"`{shlex.join(words)}` failed:\n{done.stderr[-2000:]}"
        assert "Traceback" not in done.stderr, shlex.join(words)
