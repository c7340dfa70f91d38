"""Activation memory and FLOPs of a full-size model's step in each memory-saving level, on a CPU.

A full-size model does not fit a CPU step, but its layers are all alike: the step is measured
(`step_time.measure`, the real `Inversion.run_step`) on full-width models with 1 or 2 language
layers and 2 or 3 vision layers, batch 1, and the per-layer costs are extrapolated to the declared
depth and batch. What the forward keeps for the backward pass (`saved_gib`) scales with depth and
batch; the weights come on top of it, and a GPU's peak adds what one layer holds during its
backward. One JSON line per mode.

    python benchmarks/memory_estimate.py --models llava-llama3 --batch 4     # about 5 minutes
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch
import transformers

from mimic_toolkit.registry import build_registry

_spec = importlib.util.spec_from_file_location("step_time", Path(__file__).with_name("step_time.py"))
step_time = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_time)

# (language layers, vision layers) of the three shallow models: base, one more LM layer, one more vision layer
DEPTHS = [(1, 2), (2, 2), (1, 3)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="llava-llama3")
    parser.add_argument("--modes", default="lean,recompute_selective,recompute_layers")
    parser.add_argument("--batch", type=int, default=4, help="the batch to extrapolate to")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    registry = build_registry()
    for name in args.models.split(","):
        spec = registry.adapter_spec(name)
        adapter_class = spec.load_class()
        full = adapter_class.architecture("full")
        with torch.device("meta"):  # the parameter count of the full model, without its memory
            model = getattr(transformers, adapter_class.model_class)._from_config(full)
        weights_gib = sum(p.numel() for p in model.parameters()) * 2 / 2**30  # bf16
        depth = declared_depth(full)
        modes = args.modes.split(",")
        shallow = measure_depths(registry, spec.id, adapter_class, "full", torch.bfloat16, modes, DEPTHS)
        for mode in modes:
            # memory and FLOPs grow with the batch; the number of operators does not
            fields = {field: {"per_lm_layer": round(per_lm, 4), "per_vision_layer": round(per_vision, 4),
                              "full_depth_batch_1": round(total, 3),
                              "full_depth": round(total * (1 if field == "operators" else args.batch), 3)}
                      for field, (per_lm, per_vision, total) in extrapolate(shallow[mode], depth).items()}
            print(json.dumps(dict(model=spec.id, mode=mode, batch=args.batch, depth=depth,
                                  weights_gib=round(weights_gib, 2), **fields,
                                  weights_plus_saved_gib=round(weights_gib + fields["saved_gib"]["full_depth"], 2))),
                  flush=True)


def declared_depth(config) -> tuple[int, int]:
    """(language layers, vision layers); Qwen2-VL counts its vision blocks as `depth`."""
    vision = config.vision_config
    return config.text_config.num_hidden_layers, getattr(vision, "depth", None) or vision.num_hidden_layers


def measure_depths(registry, model_id, adapter_class, size, dtype, modes, depths) -> dict:
    """mode -> (language, vision) depth -> the benchmark's row of one batch-1 step."""
    rows = {mode: {} for mode in modes}
    for depth in depths:
        adapter = step_time.build_adapter(adapter_class, size, "cpu", dtype, depth)
        prompt = step_time.random_prompt(adapter, 40, 24)
        for mode in modes:
            rows[mode][depth] = step_time.measure(registry, model_id, adapter, prompt, mode, 1, warmup=0, iters=1)
    return rows


def extrapolate(rows: dict, depth: tuple[int, int]) -> dict:
    """Per field: the cost of one more language layer, of one more vision layer, and the total at
    `depth`, from the rows at the three DEPTHS (every layer of a kind costs the same)."""
    out = {}
    for field in ("saved_gib", "counted_gflop", "operators"):
        base, more_lm, more_vision = (rows[d][field] for d in DEPTHS)
        per_lm, per_vision = more_lm - base, more_vision - base
        (lm, vision), (lm0, vision0) = depth, DEPTHS[0]
        out[field] = (per_lm, per_vision, base + (lm - lm0) * per_lm + (vision - vision0) * per_vision)
    return out


if __name__ == "__main__":
    main()
