"""One run folder, one process (issue 16): a second process started on a live run (a requeued Slurm
task) refuses it in one line, or, in a sweep, skips the class; two real processes on CPU."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mimic_toolkit.errors import UserError
from mimic_toolkit.runfolder import RunBusy, RunFolder

STEPS = 100
LONG = ["--iterations", STEPS, "--batch-size", "1", "--quiet"]  # the bundled toy model; long enough to overlap


def mimic(*args, cwd):
    return subprocess.Popen([sys.executable, "-m", "mimic_toolkit", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, first: subprocess.Popen):
    """Until the first process has written its first metrics row (it holds the lock then)."""
    while not path.is_file():
        assert first.poll() is None, first.communicate()
        time.sleep(0.1)


def steps(metrics: Path) -> list[int]:
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()]


@pytest.mark.slow
def test_a_second_invert_into_a_live_run_is_one_error_line(tmp_path):
    first = mimic("invert", *LONG, "--outputs", "run", cwd=tmp_path)
    wait_for(tmp_path / "run.partial" / "metrics.jsonl", first)
    second = mimic("invert", *LONG, "--outputs", "run", cwd=tmp_path)
    _, err = second.communicate(timeout=120)
    assert first.poll() is None, "the first run ended before the second tried: no overlap tested"
    assert second.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert f"is being run by another process (pid {first.pid} on host" in err
    assert first.wait(timeout=600) == 0, first.communicate()
    assert steps(tmp_path / "run" / "metrics.jsonl") == sorted(set(steps(tmp_path / "run" / "metrics.jsonl")))
    assert not (tmp_path / ".run.lock").exists()


@pytest.mark.slow
def test_the_same_sweep_shard_started_twice_skips_the_live_class(tmp_path):
    sweep = ["sweep", *LONG, "--classes", "0,1", "--outputs", "sw"]
    first = mimic(*sweep, cwd=tmp_path)
    wait_for(tmp_path / "sw" / "c0.partial" / "metrics.jsonl", first)
    second = mimic(*sweep, cwd=tmp_path)  # skips class 0, runs class 1
    _, second_err = second.communicate(timeout=600)
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0 and second.returncode == 0, (first_err, second_err)
    said = [line for line in second_err.splitlines() if line.startswith("class 0")]
    # while the second loads the model, the first may finish class 0 on a busy machine: skipped either way
    assert len(said) == 1 and said[0].endswith("skipped"), said
    assert "is being run by another process" in said[0] or "finished by another process" in said[0], said
    for run in ("c0", "c1"):  # each class run by one process: every step logged once
        logged = steps(tmp_path / "sw" / run / "metrics.jsonl")
        assert logged == sorted(set(logged)) and logged[-1] == STEPS
    assert not list((tmp_path / "sw").glob(".*.lock"))


def test_a_lock_file_left_by_a_dead_process_locks_nothing(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import sys; from mimic_toolkit.runfolder import RunFolder; "
                           "RunFolder(sys.argv[1]).lock(); import os; os._exit(9)", str(tmp_path / "run")])
    assert dead.returncode == 9 and (tmp_path / ".run.lock").is_file()  # its file is left behind
    run = RunFolder(tmp_path / "run")
    run.lock()
    assert (tmp_path / ".run.lock").read_text() == f"pid {os.getpid()} on host {os.uname().nodename}"
    with pytest.raises(RunBusy, match=f"pid {os.getpid()}"):
        RunFolder(tmp_path / "run").lock()  # a second holder, even in this process
    run.unlock()
    assert not (tmp_path / ".run.lock").exists()
    assert issubclass(RunBusy, UserError)
