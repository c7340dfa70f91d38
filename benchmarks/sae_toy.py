"""Held-out toy-shapes datasets for `mimic sae layers` (README "mimic sae", RESULTS.md "SAEs on
visual tokens"): generator images with their labels, seeds the toy never trained on.

    python benchmarks/sae_toy.py --out data/sae-toy        # train.jsonl (480) and test.jsonl (160)
    mimic sae layers --model toy --dataset data/sae-toy/train.jsonl --test-dataset data/sae-toy/test.jsonl \\
        --sites lm.embed,lm.0,lm.1 --out runs/sae-layers
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from mimic_plugins.toy_shapes import shapes

SEED = 20261202  # the toy trained on seed 0's streams


def write_dataset(folder: Path, name: str, count: int, seed: int) -> Path:
    rng = np.random.default_rng((SEED, seed))
    (folder / name).mkdir(parents=True)
    lines = []
    for i in range(count):
        index = int(rng.integers(0, len(shapes.SHAPES) * len(shapes.COLOURS)))
        shape, colour = shapes.split_class(index)
        pixels = shapes.render(shape, colour, rng)
        path = Path(name) / f"{i:04d}.png"
        Image.fromarray((pixels * 255).round().astype(np.uint8)).save(folder / path)
        lines.append({"id": f"{name}-{i:04d}", "image": str(path), "question": shapes.DEFAULT_QUESTION,
                      "labels": {"colour": colour, "shape": shape, "answer": f"a {colour} {shape}"}})
    dataset = folder / f"{name}.jsonl"
    dataset.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=480)
    parser.add_argument("--test", type=int, default=160)
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists")
    print(write_dataset(args.out, "train", args.train, 1))
    print(write_dataset(args.out, "test", args.test, 2))


if __name__ == "__main__":
    main()
