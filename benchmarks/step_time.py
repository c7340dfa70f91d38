"""Time the toolkit's real inversion step (`Inversion.run_step`) on random-initialised models.

Each adapter declares its architectures (`architecture(size)`): "full" is the public
checkpoint's (no weights needed), "mid" a CPU-sized model of the same layout. The prompt is random
text around the adapter's image tokens with the answer at the end; the objective is the adapter's
default one (feature statistics against stand-in targets included). One JSON line per
(model, mode, batch); see benchmarks/README.md for the fields.

    python benchmarks/step_time.py --size mid --models llava-llama3 --modes lean,reference --iters 2
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import time
from contextlib import contextmanager

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from mimic_toolkit.adapter import IGNORE_INDEX, Prompt
from mimic_toolkit.features import FeatureRecorder, FeatureStats
from mimic_toolkit.inversion import Inversion, build_inversion
from mimic_toolkit.registry import build_registry
from mimic_toolkit.session import build_config

# mode -> the toolkit settings it runs with; "reference" adds the reference implementation's style
MODES = {
    "reference": {},
    "lean": {},
    "compile": {"compile": True},
    "recompute_selective": {"memory_saving": "selective"},
    "recompute_layers": {"memory_saving": "layers"},
    "compile_recompute_selective": {"compile": True, "memory_saving": "selective"},
    "compile_recompute_layers": {"compile": True, "memory_saving": "layers"},
}


def main(argv=None) -> None:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)  # on a shared CPU one thread gives steadier timings; ratios are what count
    size = args.size or ("full" if device == "cuda" else "mid")
    # by default what the toolkit's dtype "auto" picks
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    peak = matmul_tflops(device, dtype)
    emit(date=time.strftime("%Y-%m-%d %H:%M:%S %z"), torch=torch.__version__, transformers=transformers.__version__,
         device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
         size=size, dtype=str(dtype).removeprefix("torch."), matmul_tflops=round(peak, 3))
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # graph breaks are counted in the lines instead
    registry = build_registry()
    for name in args.models.split(","):
        spec = registry.adapter_spec(name)
        adapter = build_adapter(spec.load_class(), size, device, dtype, args.depth)
        prompt = random_prompt(adapter, args.prompt_tokens, args.answer_tokens)
        for mode in args.modes.split(","):
            for batch in map(int, (args.batches or ("4" if device == "cuda" else "1")).split(",")):
                try:
                    row = measure(registry, spec.id, adapter, prompt, mode, batch, args.warmup, args.iters)
                except Exception as exc:  # one failing setting (out of memory, say) must not lose the others
                    row = dict(error=f"{type(exc).__name__}: {str(exc)[:300]}")
                emit(model=spec.id, size=size, mode=mode, batch=batch, **row,
                     **fraction_of_peak(row, peak))
                release_memory()
        del adapter
        release_memory()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("full", "mid", "tiny"),
                        help="default: full on a GPU, mid on a CPU; tiny: the test models (host overhead per operator)")
    parser.add_argument("--models", default="llava-llama3,qwen2-vl,idefics2")
    parser.add_argument("--modes", default="reference,lean,compile,recompute_selective,recompute_layers")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--depth", type=int, nargs=2, metavar=("LM", "VISION"),
                        help="only this many language and vision layers (widths unchanged): per-layer costs")
    parser.add_argument("--batches", help="comma-separated batch sizes; default: 4 on a GPU, 1 on a CPU")
    parser.add_argument("--prompt-tokens", type=int, default=40, help="random text tokens around the image")
    parser.add_argument("--answer-tokens", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compiling happens here)")
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args(argv)
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"unknown mode {sorted(unknown)[0]!r} (modes: {', '.join(MODES)})")
    return args


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def matmul_tflops(device: str, dtype: torch.dtype) -> float:
    """The measured rate of one large matmul: what "fraction of peak" is relative to."""
    n = 8192 if device == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    start, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def synchronize(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def build_adapter(adapter_class, size: str, device: str, dtype: torch.dtype, depth=None):
    """A random-initialised model of the declared architecture, created on the device directly."""
    if size == "tiny":  # the tests' models, whose steps are nearly all host work
        adapter = adapter_class.tiny()
        adapter.model.to(device, dtype)
        return adapter
    model_class = getattr(transformers, adapter_class.model_class)
    config = adapter_class.architecture(size)
    if depth:
        lm_layers, vision_layers = depth
        config.text_config.num_hidden_layers = lm_layers
        types = getattr(config.text_config, "layer_types", None)
        if types:  # the per-layer attention pattern, repeated to the new depth
            config.text_config.layer_types = [types[i % len(types)] for i in range(lm_layers)]
        vision = config.vision_config  # Qwen2-VL counts its vision blocks as `depth`
        setattr(vision, "depth" if hasattr(vision, "depth") else "num_hidden_layers", vision_layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype)
    return adapter_class(model, tokenizer=None)


def random_prompt(adapter, text_tokens: int, answer_tokens: int) -> Prompt:
    """Random text ids with the image after the first few (where a chat's first user turn puts it),
    the answer last. Ids below the image token's are ordinary tokens of every supported vocabulary."""
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(0, adapter.image_token_id, (text_tokens + answer_tokens,), generator=generator)
    image = torch.tensor(adapter.image_placeholder_ids())
    before = 4
    ids = torch.cat([text[:before], image, text[before:]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[-answer_tokens:] = ids[-answer_tokens:]
    return Prompt(ids, labels, torch.arange(before, before + len(image)))


def measure(registry, model_id: str, adapter, prompt: Prompt, mode: str, batch: int, warmup: int, iters: int) -> dict:
    device = adapter.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with execution_mode(adapter, mode == "reference"), \
            default_inversion(registry, model_id, adapter, prompt, batch_size=batch, **MODES[mode]) as inversion:
        config = inversion.config
        started = time.perf_counter()
        for _ in range(warmup):
            inversion.run_step()
        synchronize(device)
        warmup_s = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(iters):
            inversion.run_step()
        synchronize(device)
        seconds = (time.perf_counter() - started) / iters
        finite = bool(torch.isfinite(inversion.images.grad).all())
        saved, counted_flops, operators = (None,) * 3 if config.compile else count_one_step(adapter, inversion)
        weight_grads = any(p.grad is not None for p in adapter.model.parameters())
    params = sum(p.numel() for p in adapter.model.parameters())
    tokens = batch * len(prompt.input_ids)
    # matmul FLOPs as the team's method notes count them: 2 * params * tokens forward, as much again for the
    # gradient of the inputs, and again for the weights' gradients when those are computed
    flops = 2 * params * tokens * (3 if weight_grads else 2)
    return dict(dtype=str(adapter.dtype).removeprefix("torch."), params_b=round(params / 1e9, 3), tokens=tokens,
                ms_per_step=round(1000 * seconds, 2), warmup_s=round(warmup_s, 1),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
                saved_gib=None if saved is None else round(saved / 2**30, 4),
                counted_gflop=None if counted_flops is None else round(counted_flops / 1e9, 2),
                operators=operators,
                tokens_per_s=round(tokens / seconds), tflops_est=round(flops / seconds / 1e12, 3),
                weight_grads=weight_grads, grads_finite=finite,
                **({"graph_breaks": graph_breaks()} if config.compile else {}))


def default_inversion(registry, model_id: str, adapter, prompt: Prompt, **settings) -> Inversion:
    """An inversion with the model's default objective at its resolution (feature statistics
    against stand-in targets), `settings` on top."""
    config = build_config(registry, dict(model=model_id, resolution=adapter.resolution, **settings))
    stats = stand_in_statistics(adapter) if config.scales.get("feature") else None
    return build_inversion(registry, adapter, prompt, config, stats)


def count_one_step(adapter, inversion) -> tuple[int, int, int]:
    """One more step, counted on any device: the bytes its forward keeps for the backward pass
    (the activations; weights excluded), tensor by tensor; the FLOPs of the whole step as torch's
    counter counts them (matmuls and attention, recomputation included); and the operators it
    dispatches, views left out: about one GPU kernel launch each in an eager step."""
    weights = {p.untyped_storage().data_ptr() for p in adapter.model.parameters()}
    kept = {}

    def count(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with FlopCounterMode(display=False) as flops, OperatorCounter() as operators:
        with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            loss, _, _ = inversion.objective(inversion.augment(inversion.images))
        loss.backward()
    return sum(kept.values()), flops.get_total_flops(), operators.count


class OperatorCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def fraction_of_peak(row: dict, peak_tflops: float) -> dict:
    return {"fraction_of_matmul_peak": round(row["tflops_est"] / peak_tflops, 3)} if "tflops_est" in row else {}


@contextmanager
def execution_mode(adapter, reference: bool):
    """Leaves the shared model as it found it: frozen, no weight gradients, the adapter's own
    forward (the inversion itself undoes its activation checkpointing when it closes)."""
    if reference:
        reference_style(adapter)
    try:
        yield
    finally:
        if "target_logits" in vars(adapter):
            del adapter.target_logits
        adapter.model.requires_grad_(False).zero_grad(set_to_none=True)


def reference_style(adapter) -> None:
    """Emulates how the reference implementation runs the step, with its two costly defects: every
    weight requires grad, so the backward also computes (and accumulates) weight gradients, and the
    model computes logits at every position over the whole vocabulary, plus its own unused loss."""
    adapter.model.requires_grad_(True)

    def all_position_logits(images, prompt):
        batch = images.shape[0]
        labels = prompt.labels.to(adapter.device).expand(batch, -1)
        out = adapter.model(**adapter.pixel_inputs(images), **adapter.text_inputs(prompt, batch), labels=labels,
                            use_cache=False)
        return out.logits[:, -prompt.n_target - 1:-1].float()

    adapter.target_logits = all_position_logits


def stand_in_statistics(adapter) -> FeatureStats:
    """A grey image's feature statistics as targets: the term's cost does not depend on their values."""
    side = adapter.resolution
    grey = adapter.normalise(torch.full((1, 3, side, side), 0.5))
    with torch.no_grad(), FeatureRecorder(adapter, 1) as recorder:
        adapter.vision_forward(grey)
    means = {site: mean[0].cpu() for site, (mean, _) in recorder.stats.items()}
    variances = {site: var[0].cpu() for site, (_, var) in recorder.stats.items()}
    return FeatureStats(means, variances, meta={})


def release_memory() -> None:
    torch._dynamo.reset()  # compiled graphs of a finished mode would only fill the cache
    torch._dynamo.utils.counters.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
