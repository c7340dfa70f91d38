"""The paper's ablation table, on the bundled toy-shapes model where the truth is known.

For each objective (CE only; + feature statistics; + patch prior; + TV/L2 priors; + the R_V guide
prior; + a 4-view augmentation ensemble) every one of the 24 concepts is inverted (4 images each)
and the independent verifier CNN scores the images; with --curve, the last row's accuracy is also
recorded against the number of steps. --model toy-shapes-v1 gives the same rows for the first,
ungrounded toy.

    python benchmarks/ablation.py                    # all rows, 24 concepts (an hour on 2 cores)
    python benchmarks/ablation.py --concepts 0,7 --steps 50 --rows ce,full   # a quick look
    python benchmarks/ablation.py --model toy-shapes-v1 --grids grids/   # also save one grid per row

Prints one JSON line per row (and per curve point) and a markdown table for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from mimic_plugins.toy_shapes import shapes, verifier
from mimic_plugins.toy_shapes.evaluation import CHECK_QUESTIONS, answer_probability
from mimic_toolkit.config import InversionConfig
from mimic_toolkit.engine import format_prompt
from mimic_toolkit.features import FeatureStats
from mimic_toolkit.inversion import build_inversion
from mimic_toolkit.registry import default_registry
from mimic_toolkit.session import build_config, load_configured

FULL = ["main", "feature", "patch", "tv_l1", "tv_l2", "l2"]
GUIDE_SCALE = 3e-4  # R_V's best scale on the first toy (issue 10: 3e-4 of 3e-4..1e-2)
ONE_VIEW = {"views": 1, "transforms": None}  # the classic jitter and flip
ENSEMBLE = {"views": 4, "transforms": "crop:0.3-1,shift:4,flip,colour:0.1,blur:1.5"}
# Each row switches terms (and settings) on over the previous one, as in the paper's table.
ROWS = {
    "ce": ("CE only", ["main"], ONE_VIEW),
    "features": ("+ feature statistics", ["main", "feature"], ONE_VIEW),
    "patch": ("+ patch prior", ["main", "feature", "patch"], ONE_VIEW),
    "full": ("+ TV/L2 priors (full objective)", FULL, ONE_VIEW),
    "guide": ("+ R_V guide prior", FULL + ["guide"], ONE_VIEW),
    "views": ("+ 4-view augmentation ensemble", FULL + ["guide"], ENSEMBLE),
}


def invert_concept(adapter, config: InversionConfig, terms, settings, index: int, curve_points=()):
    """Invert one concept; returns (final images in [0, 1], seconds per step, {step: images})."""
    registry = default_registry()
    prompt = format_prompt(adapter, [(shapes.DEFAULT_QUESTION, "a " + shapes.class_name(index))])
    scales = {n: (s if n in terms else 0.0) for n, s in config.scales.items()}
    if "guide" in terms and not scales.get("guide"):  # off in the defaults: the row gives it its scale
        scales["guide"] = GUIDE_SCALE
    row_config = replace(config, scales=scales, **settings)
    stats = FeatureStats.find(adapter.spec.stats, adapter.model_id, index) if "feature" in terms else None
    snapshots = {}
    with build_inversion(registry, adapter, prompt, row_config, stats) as inversion:
        started = time.perf_counter()
        while inversion.step < config.iterations:
            inversion.run_step()
            if inversion.step in curve_points:
                snapshots[inversion.step] = adapter.denormalise(inversion.images.detach())
        seconds = (time.perf_counter() - started) / config.iterations
        return adapter.denormalise(inversion.images.detach()), seconds, snapshots


def score(adapter, classifier, images01, index):
    shape, colour = shapes.split_class(index)
    shape_p, colour_p = verifier.predict(images01, classifier)
    shape_ok = shape_p.argmax(-1) == shapes.SHAPES.index(shape)
    colour_ok = colour_p.argmax(-1) == shapes.COLOURS.index(colour)
    return {"shape": shape_ok.float().mean().item(), "colour": colour_ok.float().mean().item(),
            "both": (shape_ok & colour_ok).float().mean().item(),
            "predicted": shape_p.argmax(-1).tolist(),
            "p_target": answer_probability(adapter, images01, shapes.DEFAULT_QUESTION, "a " + shapes.class_name(index)).mean().item(),
            "p_shape_question": answer_probability(adapter, images01, CHECK_QUESTIONS["shape"], shape).mean().item()}


def summarise(label, scores, indices, seconds):
    n = len(scores)
    predicted = [p for s in scores for p in s["predicted"]]
    targets = [shapes.SHAPES.index(shapes.split_class(i)[0]) for i, s in zip(indices, scores) for _ in s["predicted"]]
    chance = sum(predicted.count(k) / len(predicted) * targets.count(k) / len(targets) for k in range(len(shapes.SHAPES)))
    mean = lambda key: sum(s[key] for s in scores) / n
    return {"row": label, "concepts": n, "shape": mean("shape"), "colour": mean("colour"), "both": mean("both"),
            "shape_shuffled_baseline": chance, "p_target": mean("p_target"),
            "p_shape_question": mean("p_shape_question"), "ms_per_step": 1000 * seconds}


def save_grid(images01: torch.Tensor, path: Path, columns: int = 12) -> None:
    """One PNG of the images [N, 3, H, W] in rows of `columns`, 2x nearest-upscaled."""
    columns = min(columns, len(images01))
    rows = -(-len(images01) // columns)
    padded = torch.cat([images01, images01.new_ones(rows * columns - len(images01), *images01.shape[1:])])
    _, c, h, w = padded.shape
    grid = padded.reshape(rows, columns, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, columns * w, c)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (grid.clamp(0, 1) * 255).round().byte().numpy()
    Image.fromarray(pixels).resize((columns * w * 2, rows * h * 2), Image.NEAREST).save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--model", default="toy-shapes", help="toy-shapes (grounded) or toy-shapes-v1 (the first toy)")
    parser.add_argument("--grids", default=None, help="folder to save one PNG grid per row (first image of each concept)")
    parser.add_argument("--concepts", default="all", help="comma-separated class indices, or all")
    parser.add_argument("--steps", type=int, default=None, help="default: the toy model's default iterations")
    parser.add_argument("--curve", default="", help="steps at which to score the full objective, e.g. 25,50,100,200,300")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", action="append", default=[], help="NAME=VALUE: override a term's scale")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--jitter", type=int, default=None)
    parser.add_argument("--parameterisation", default=None, help="pixel | fourier[:D] | lowres:F (default: the toy model's)")
    parser.add_argument("--feature-form", default=None, help="l2 | kl (default: the toy model's)")
    parser.add_argument("--init", default=None, help="noise | blank (default: the toy model's)")
    parser.add_argument("--threads", type=int, default=2, help="1 is faster when other work shares the cores")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    registry = default_registry()
    flags = {"model": args.model, "seed": args.seed}
    if args.steps:
        flags["iterations"] = args.steps
    if args.lr:
        flags["lr"] = args.lr
    if args.jitter is not None:
        flags["jitter"] = args.jitter
    for key in ("parameterisation", "feature_form", "init"):
        if getattr(args, key) is not None:
            flags[key] = getattr(args, key)
    if args.scale:
        flags["scales"] = {k: float(v) for k, v in (s.split("=") for s in args.scale)}
    config = build_config(registry, flags)
    config.resolution = 64
    adapter = load_configured(registry, config, "cpu")
    classifier = verifier.load_verifier()
    indices = list(range(24)) if args.concepts == "all" else [int(c) for c in args.concepts.split(",")]
    curve = sorted(int(s) for s in args.curve.split(",") if s)
    table = []
    for key in args.rows.split(","):
        label, terms, settings = ROWS[key]
        scores, seconds, curve_scores, firsts = [], 0.0, {s: [] for s in curve}, []
        last_row = key == args.rows.split(",")[-1]
        for index in indices:
            images, per_step, snaps = invert_concept(adapter, config, terms, settings, index, curve if last_row else ())
            firsts.append(images[0])
            scores.append(score(adapter, classifier, images, index))
            seconds += per_step / len(indices)
            for step, snap in snaps.items():
                curve_scores[step].append(score(adapter, classifier, snap, index))
        row = summarise(label, scores, indices, seconds)
        table.append(row)
        if args.grids:
            save_grid(torch.stack(firsts), Path(args.grids) / f"{args.model}-{key}.png")
        print(json.dumps(row), flush=True)
        for step, rows in curve_scores.items():
            if rows:
                print(json.dumps({"curve_step": step, **summarise(label, rows, indices, seconds)}), flush=True)
    print(f"\n{args.model}: {config.iterations} steps, batch {config.batch_size}, lr {config.lr}, jitter {config.jitter}, "
          f"{config.parameterisation} parameterisation, init {config.init}, feature form {config.feature_form}, "
          f"scales {config.scales}\n")
    print("| objective | shape | colour | both | shape, shuffled-target baseline | P(target) | P(shape answer) | ms/step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['row']} | {r['shape']:.0%} | {r['colour']:.0%} | {r['both']:.0%} | {r['shape_shuffled_baseline']:.0%} "
              f"| {r['p_target']:.2f} | {r['p_shape_question']:.2f} | {r['ms_per_step']:.1f} |")


if __name__ == "__main__":
    main()
