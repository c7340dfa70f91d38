"""Data-parallel runs: every process optimises its own images (seed + rank) into one run folder.
`accelerate launch --multi_gpu` does this on GPUs; on CPU, torchrun starts the same processes."""
import shutil
import subprocess

import pytest
from PIL import Image, ImageChops


@pytest.mark.slow
def test_two_processes_write_distinct_images_into_one_run_folder(tiny_checkpoint, in_tmp):
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun is not installed")
    cmd = [torchrun, "--nproc_per_node", "2", "-m", "mimic_toolkit", "invert", "--checkpoint", str(tiny_checkpoint),
           "--question", "What is in the image?", "--answer", "a red circle", "--iterations", "3",
           "--batch-size", "1", "--feature-loss-scale", "0", "--outputs", "run", "--device", "cpu", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("run folder: run") == 1  # only rank 0 speaks
    folder = in_tmp / "run"
    assert sorted(p.name for p in (folder / "images").iterdir()) == ["rank0_00.png", "rank1_00.png"]
    a, b = (Image.open(folder / "images" / n) for n in ("rank0_00.png", "rank1_00.png"))
    assert ImageChops.difference(a, b).getbbox() is not None  # different seeds, different images
    assert {"metrics.rank0.jsonl", "metrics.rank1.jsonl", "report.html"} <= {p.name for p in folder.iterdir()}
    assert not (in_tmp / "run.partial").exists()
