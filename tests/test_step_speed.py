"""The step-time benchmark and the step's hot path: the adapters' benchmark architectures, the
benchmark's JSON lines, its reference-style emulation, and teacher-forcing inputs that are built once
per prompt yet give exactly the logits of the model's own forward."""
import importlib.util
import json
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from mimic_plugins.idefics2.adapter import Idefics2Adapter
from mimic_plugins.llava_llama3.adapter import LlavaLlama3Adapter
from mimic_plugins.qwen2_vl.adapter import Qwen2VLAdapter
from mimic_toolkit.registry import build_registry

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = ROOT / "benchmarks" / "step_time.py"
_spec = importlib.util.spec_from_file_location("step_time", BENCHMARK)
step_time = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_time)

# adapter, billions of parameters of the public checkpoint, image tokens, input side
ARCHITECTURES = [(LlavaLlama3Adapter, 8.355, 576, 336), (Qwen2VLAdapter, 8.291, 256, 448),
                 (Idefics2Adapter, 8.403, 64, 378)]
TINY = {"llava": LlavaLlama3Adapter, "qwen2_vl": Qwen2VLAdapter, "idefics2": Idefics2Adapter}


@pytest.fixture(scope="module")
def registry():
    return build_registry()


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tiny_llava):
    return tiny_llava if request.param == "llava" else TINY[request.param].tiny()


def on_meta(adapter_class, size):
    with torch.device("meta"):  # shapes only: a full-size model costs no memory here
        model = getattr(transformers, adapter_class.model_class)._from_config(adapter_class.architecture(size))
    return adapter_class(model, tokenizer=None)


@pytest.mark.parametrize("adapter_class, billions, image_tokens, side", ARCHITECTURES)
def test_full_benchmark_architectures_are_the_public_ones_and_mid_keeps_their_layout(adapter_class, billions,
                                                                                       image_tokens, side):
    full, mid = on_meta(adapter_class, "full"), on_meta(adapter_class, "mid")
    assert sum(p.numel() for p in full.model.parameters()) / 1e9 == pytest.approx(billions, abs=5e-4)
    for adapter in (full, mid):
        assert (adapter.image_token_count(), adapter.resolution, adapter.patch_size) == (image_tokens, side, 14)
    assert sum(p.numel() for p in mid.model.parameters()) < 1e7


def test_an_adapter_without_architectures_says_so():
    from mimic_toolkit.adapter import VLMAdapter

    with pytest.raises(NotImplementedError, match=r"architecture\(size\)"):
        VLMAdapter.architecture("mid")


@pytest.mark.parametrize("model_id", ["llava-llama3", "qwen2-vl", "idefics2"])
def test_each_mid_benchmark_model_runs_the_real_step(registry, model_id):
    adapter_class = registry.adapter_spec(model_id).load_class()
    adapter = step_time.build_adapter(adapter_class, "mid", "cpu", torch.float32)
    prompt = step_time.random_prompt(adapter, 40, 24)
    assert int((prompt.input_ids == adapter.image_token_id).sum()) == adapter.image_token_count()
    row = step_time.measure(registry, model_id, adapter, prompt, "lean", 1, warmup=0, iters=1)
    assert row["tokens"] == 40 + adapter.image_token_count() + 24
    assert row["grads_finite"] and not row["weight_grads"] and row["ms_per_step"] > 0


@pytest.mark.parametrize("model_id", ["llava-llama3", "qwen2-vl", "idefics2"])
def test_each_memory_saving_level_keeps_less_for_the_backward_and_gives_the_same_gradient(registry, model_id):
    adapter = step_time.build_adapter(registry.adapter_spec(model_id).load_class(), "mid", "cpu", torch.float32)
    prompt = step_time.random_prompt(adapter, 40, 24)
    rows, grads = {}, {}
    for mode in ("lean", "recompute_selective", "recompute_layers"):
        rows[mode] = step_time.measure(registry, model_id, adapter, prompt, mode, 2, warmup=0, iters=1)
        with step_time.default_inversion(registry, model_id, adapter, prompt, batch_size=2, jitter=0, flip=False,
                                         **step_time.MODES[mode]) as inversion:
            inversion.objective(inversion.images)[0].backward()
            grads[mode] = inversion.images.grad
    kept = [rows[mode]["saved_gib"] for mode in ("lean", "recompute_selective", "recompute_layers")]
    assert kept[0] > kept[1] > kept[2] > 0, kept
    for mode in ("recompute_selective", "recompute_layers"):
        assert torch.allclose(grads[mode], grads["lean"], rtol=1e-4, atol=1e-6), mode


def test_reference_style_computes_weight_grads_and_logits_everywhere_and_lean_does_not(registry, tiny_llava):
    prompt = step_time.random_prompt(tiny_llava, 8, 3)
    vocab = tiny_llava.model.config.text_config.vocab_size
    head_outputs = []
    handle = tiny_llava.model.lm_head.register_forward_hook(lambda m, i, out: head_outputs.append(out.shape))
    try:
        reference = step_time.measure(registry, "llava-llama3", tiny_llava, prompt, "reference", 2, warmup=0, iters=1)
        reference_heads, head_outputs[:] = head_outputs[:], []
        lean = step_time.measure(registry, "llava-llama3", tiny_llava, prompt, "lean", 2, warmup=0, iters=1)
    finally:
        handle.remove()
    assert reference["weight_grads"] and not lean["weight_grads"]
    assert reference_heads and set(reference_heads) == {(2, len(prompt.input_ids), vocab)}
    assert head_outputs and set(head_outputs) == {(2, prompt.n_target + 1, vocab)}
    assert reference["grads_finite"] and lean["grads_finite"]
    # the shared model is left as it was: frozen, no gradients, the adapter's own forward
    assert not any(p.requires_grad or p.grad is not None for p in tiny_llava.model.parameters())
    assert "target_logits" not in vars(tiny_llava)


def test_the_benchmark_prints_one_json_line_per_setting():
    result = subprocess.run([sys.executable, str(BENCHMARK), "--size", "mid", "--models", "idefics2",
                             "--modes", "lean,reference", "--batches", "1,2", "--warmup", "0", "--iters", "1"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    header, *rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert {"torch", "transformers", "device", "matmul_tflops"} <= set(header) and header["size"] == "mid"
    assert [(r["mode"], r["batch"]) for r in rows] == [("lean", 1), ("lean", 2), ("reference", 1), ("reference", 2)]
    for row in rows:
        assert "error" not in row, row["error"]
        assert row["ms_per_step"] > 0 and row["tokens_per_s"] > 0 and row["tflops_est"] > 0
        assert 0 < row["fraction_of_matmul_peak"] and row["peak_gib"] is None  # no GPU memory on a CPU
        assert row["weight_grads"] == (row["mode"] == "reference")
        assert row["saved_gib"] > 0 and row["counted_gflop"] > 0 and row["operators"] > 0
    by_mode = {(r["mode"], r["batch"]): r for r in rows}
    for batch in (1, 2):  # weight gradients and logits everywhere: more kept, more work, more launches
        lean, reference = by_mode["lean", batch], by_mode["reference", batch]
        assert all(reference[f] > lean[f] for f in ("saved_gib", "counted_gflop", "operators"))


def test_the_tiny_size_times_the_test_models_whose_step_is_mostly_host_work(registry):
    adapter = step_time.build_adapter(LlavaLlama3Adapter, "tiny", "cpu", torch.float32)
    assert sum(p.numel() for p in adapter.model.parameters()) < 1e6
    row = step_time.measure(registry, "llava-llama3", adapter, step_time.random_prompt(adapter, 8, 3), "lean", 1,
                            warmup=0, iters=1)
    assert row["operators"] > 100 and row["ms_per_step"] > 0


def test_an_unknown_mode_is_refused_by_name():
    result = subprocess.run([sys.executable, str(BENCHMARK), "--modes", "lean,fast"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "unknown mode 'fast'" in result.stderr


def test_teacher_forced_logits_are_exactly_those_of_the_models_own_forward(tiny):
    """No attention mask, inputs cached, Qwen2-VL's M-RoPE positions computed once: same logits."""
    prompt = tiny.build_prompt([("What is in the image?", "a red circle")])
    images = torch.randn(2, 3, tiny.resolution, tiny.resolution)
    with torch.no_grad():
        ours = tiny.target_logits(images, prompt)
        again = tiny.target_logits(images, prompt)  # from the cached inputs
        own = tiny.model(**tiny.pixel_inputs(images), **tiny.text_inputs(prompt, 2),
                         logits_to_keep=prompt.n_target + 1).logits[:, :-1].float()
    assert torch.equal(ours, own) and torch.equal(again, own)


def test_teacher_forcing_inputs_are_built_once_per_prompt_and_batch_size(tiny, monkeypatch):
    built = []
    build = tiny.teacher_forcing_inputs
    monkeypatch.setattr(tiny, "teacher_forcing_inputs", lambda prompt, batch: built.append(batch) or build(prompt, batch))
    first = tiny.build_prompt([("What is in the image?", "a red circle")])
    second = tiny.build_prompt([("What is in the image?", "a blue square")])
    images = torch.randn(2, 3, tiny.resolution, tiny.resolution)
    with torch.no_grad():
        for prompt, batch in [(first, 2), (first, 2), (first, 1), (first, 1), (second, 1), (first, 1)]:
            tiny.target_logits(images[:batch], prompt)
    assert built == [2, 1, 1, 1]


class HostReads(TorchDispatchMode):
    """Records the Python function that asks for each host read of a tensor value (`.item()`,
    `bool(t)`, data-dependent shapes): on a GPU each read of a device tensor waits for the device."""

    READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
             "aten.repeat_interleave.Tensor"}
    MACHINERY = ("torch/_compile.py", "torch/_dynamo/eval_frame.py", "torch/_ops.py", "torch/utils/_python_dispatch.py")

    def __init__(self):
        super().__init__()
        self.sites = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in self.READS:
            caller = next(f for f in reversed(traceback.extract_stack())  # the frame that asked for the read
                          if not f.filename.endswith(self.MACHINERY) and f.filename != __file__)
            self.sites.append(f"{Path(caller.filename).parent.name}/{Path(caller.filename).name}:{caller.name}")
        return func(*args, **(kwargs or {}))


def test_the_steps_own_code_reads_no_tensor_back_but_its_cpu_jitter_draws(registry, tiny):
    """The GPU check (tests/test_gpu.py) watches real synchronisations; here a CPU proxy: host reads
    that the toolkit's and the adapters' own code make. The jitter and flip draws come from a CPU
    generator and never wait for a device; whatever transformers reads is its own."""
    model_id = {LlavaLlama3Adapter: "llava-llama3", Qwen2VLAdapter: "qwen2-vl", Idefics2Adapter: "idefics2"}
    prompt = tiny.build_prompt([("What is in the image?", "a red circle")])
    with step_time.default_inversion(registry, model_id[type(tiny)], tiny, prompt, batch_size=2, jitter=2,
                                     flip=True) as inversion:
        inversion.run_step()
        reads = HostReads()
        with reads:
            inversion.run_step()
    ours = [site for site in reads.sites if site.startswith(("mimic_toolkit/", "qwen2_vl/", "idefics2/",
                                                             "llava_llama3/"))]
    assert ours and set(ours) == {"mimic_toolkit/transforms.py:__call__"}  # the shift's and flip's CPU draws


def test_a_loaded_checkpoint_uses_sdpa_attention_in_every_part(tiny_checkpoint):
    model = LlavaLlama3Adapter.load(str(tiny_checkpoint)).model
    assert {model.config._attn_implementation, model.config.vision_config._attn_implementation,
            model.config.text_config._attn_implementation} == {"sdpa"}


def test_the_memory_estimate_extrapolates_shallow_models_to_a_deeper_one(registry):
    """Its premise: every layer of a kind keeps the same activations and costs the same FLOPs.
    Checked at mid width: depths (1,2), (2,2), (1,3) predict a directly measured (3,4), to the
    rounding of the benchmark's fields (the prediction weighs three rounded values by 3, 2 and 2,
    and the measurement is rounded too: at most 8 half-units of the last digit apart)."""
    spec = importlib.util.spec_from_file_location("memory_estimate", ROOT / "benchmarks" / "memory_estimate.py")
    memory_estimate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory_estimate)
    adapter_class = registry.adapter_spec("llava-llama3").load_class()
    modes = ["lean", "recompute_selective"]
    rows = memory_estimate.measure_depths(registry, "llava-llama3", adapter_class, "mid", torch.float32, modes,
                                          memory_estimate.DEPTHS + [(3, 4)])
    for mode in modes:
        for field, (per_lm, per_vision, predicted) in memory_estimate.extrapolate(rows[mode], (3, 4)).items():
            assert per_lm > 0 and per_vision > 0
            last_digit = {"saved_gib": 1e-4, "counted_gflop": 1e-2, "operators": 0}[field]
            assert predicted == pytest.approx(rows[mode][3, 4][field], abs=8 * last_digit / 2 + 1e-9), (mode, field)
