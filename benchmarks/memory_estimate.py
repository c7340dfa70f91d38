"""Activation memory and FLOPs of a full-size model's step in each memory-saving level, on a CPU.

A full-size model does not fit a CPU step, but its layers are all alike: the step is measured
(`step_time.measure`, the real `Inversion.run_step`) on full-width models with 1 or 2 language
layers and 2 or 3 vision layers, batch 1, and the per-layer costs are extrapolated to the declared
depth and batch. What the forward keeps for the backward pass (`saved_gib`) scales with depth and
batch; the weights come on top of it, and a GPU's peak adds what one layer holds during its
backward. One JSON line per mode.

    python benchmarks/memory_estimate.py --models llava-llama3 --batch 4     # about 8 minutes
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
        full = adapter_class.benchmark_config("full")
        depth = (full.text_config.num_hidden_layers,
                 getattr(full.vision_config, "depth", None) or full.vision_config.num_hidden_layers)
        with torch.device("meta"):  # the parameter count of the full model, without its memory
            params = sum(p.numel() for p in getattr(transformers, adapter_class.model_class)._from_config(full).parameters())
        rows = {}
        for layers in DEPTHS:
            adapter = step_time.build_adapter(adapter_class, "full", "cpu", torch.bfloat16, layers)
            prompt = step_time.random_prompt(adapter, 40, 24)
            for mode in args.modes.split(","):
                rows[layers, mode] = step_time.measure(registry, spec.id, adapter, prompt, mode, 1, warmup=0, iters=1)
            del adapter
        weights_gib = params * 2 / 2**30
        for mode in args.modes.split(","):
            fields = {}
            for field in ("saved_gib", "counted_gflop"):
                base, more_lm, more_vision = (rows[layers, mode][field] for layers in DEPTHS)
                per_lm, per_vision = more_lm - base, more_vision - base
                at_depth = base + (depth[0] - 1) * per_lm + (depth[1] - 2) * per_vision
                fields[field] = dict(per_lm_layer=round(per_lm, 4), per_vision_layer=round(per_vision, 4),
                                     full_depth_batch_1=round(at_depth, 3), full_depth=round(args.batch * at_depth, 3))
            print(json.dumps(dict(model=spec.id, mode=mode, batch=args.batch, depth=depth, weights_gib=round(weights_gib, 2),
                                  **fields, weights_plus_saved_gib=round(weights_gib + fields["saved_gib"]["full_depth"], 2))),
                  flush=True)


if __name__ == "__main__":
    main()
