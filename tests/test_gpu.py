"""Checks that need a CUDA device (`pytest -m gpu`, run by benchmarks/gpu_check.sh; skipped
elsewhere): the step runs on the GPU in every execution mode, a bf16 step stays finite, and a
step without metrics makes no host synchronisation from the toolkit's or the adapters' own code."""
import math
import traceback
import warnings
from pathlib import Path

import pytest
import torch

from mimic_plugins.idefics2.adapter import Idefics2Adapter
from mimic_plugins.llava_llama3.adapter import LlavaLlama3Adapter
from mimic_plugins.qwen2_vl.adapter import Qwen2VLAdapter
from mimic_toolkit.config import resolve
from mimic_toolkit.features import FeatureRecorder, FeatureStats
from mimic_toolkit.inversion import ActiveTerm, Inversion
from mimic_toolkit.terms import BUILTIN_TERMS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ADAPTERS = {"llava": LlavaLlama3Adapter, "qwen2_vl": Qwen2VLAdapter, "idefics2": Idefics2Adapter}
OUR_CODE = tuple(str(Path(__file__).resolve().parents[1] / folder) for folder in ("mimic_toolkit", "plugins"))


def tiny_on_gpu(name: str, dtype=torch.float32):
    adapter = ADAPTERS[name].tiny()
    adapter.model.to("cuda", dtype)
    return adapter


def inversion(adapter, **settings) -> Inversion:
    """The full default objective (feature statistics against a grey image's) at batch 2."""
    config = resolve([dict(iterations=50, batch_size=2, lr=0.1, jitter=2, resolution=adapter.resolution), settings])
    side = adapter.resolution
    with torch.no_grad(), FeatureRecorder(adapter, 1) as recorder:
        adapter.vision_forward(adapter.normalise(torch.full((1, 3, side, side), 0.5)))
    stats = FeatureStats({s: m[0].float().cpu() for s, (m, _) in recorder.stats.items()},
                         {s: v[0].float().cpu() for s, (_, v) in recorder.stats.items()}, meta={})
    terms = [ActiveTerm.of(t, t.default_scale) for t in BUILTIN_TERMS]
    prompt = adapter.build_prompt([("What is in the image?", "a red circle")])
    return Inversion(adapter, prompt, config, terms, stats)


@pytest.mark.parametrize("name, mode", [pytest.param(name, {"memory_saving": level}, id=f"{name}-{level}")
                                        for name in sorted(ADAPTERS) for level in ("selective", "layers")]
                         # compiling takes long; the benchmark compiles full size
                         + [pytest.param("llava", {"compile": True}, id="llava-compile")])
def test_each_execution_mode_computes_the_same_step_on_the_gpu(name, mode):
    """Same loss and image gradient as the lean default (compared on the first step: Adam's update
    of a near-zero gradient turns rounding into a full step, so later images may differ)."""
    results = []
    for settings in ({}, mode):
        adapter = tiny_on_gpu(name)
        with inversion(adapter, **settings) as run:
            loss = run.run_step(want_metrics=True)["loss"]
            results.append((loss, run.images.grad.clone()))
            for _ in range(2):
                run.run_step()
            assert torch.isfinite(run.images).all()
        torch._dynamo.reset()
    (lean_loss, lean_grad), (loss, grad) = results
    assert grad.is_cuda and loss == pytest.approx(lean_loss, rel=1e-4)
    assert (grad - lean_grad).norm() <= 1e-3 * lean_grad.norm(), "an execution mode must not change the step"


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_a_bf16_step_is_finite_and_lowers_the_loss(name):
    adapter = tiny_on_gpu(name, torch.bfloat16)
    with inversion(adapter, jitter=0, flip=False) as run:
        first = run.run_step(want_metrics=True)
        for _ in range(10):
            run.run_step()
        last = run.run_step(want_metrics=True)
    assert torch.isfinite(run.images).all() and all(math.isfinite(value) for value in last["terms"].values())
    assert last["loss"] < first["loss"]


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_a_step_without_metrics_makes_no_host_sync_from_our_code(name, capsys):
    """Every synchronising CUDA call of one step, attributed to the innermost Python frame outside
    torch. Ours (mimic_toolkit/, plugins/) must be none; transformers' own are printed, not hidden.
    Autograd re-raises the backward pass's warnings at the `backward()` call, so those are listed
    apart: they come from the backward of the model's ops (the objective's terms use none that
    synchronise)."""
    adapter = tiny_on_gpu(name, torch.bfloat16)
    syncs = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            frame = [f for f in traceback.extract_stack()[:-1]
                     if "/torch/" not in f.filename and not f.filename.endswith("warnings.py")][-1]
            backward = ".backward(" in (frame.line or "")
            syncs.append("backward pass" if backward else f"{frame.filename}:{frame.lineno} ({frame.name})")

    with inversion(adapter) as run:
        run.run_step(want_metrics=True)  # the first step builds the cached inputs
        torch.cuda.synchronize()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run.run_step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    ours = [site for site in syncs if site.startswith(OUR_CODE)]
    with capsys.disabled():
        print(f"\n{name}: {len(syncs)} synchronisation(s) in one step, {len(ours)} from our code")
        for site in sorted(set(syncs)):
            print(f"  {syncs.count(site)} x {site}")
    assert not ours
