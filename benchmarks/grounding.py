"""What a toy model answers when the image holds no shape, or a shape drawn unlike its training
images: the test of whether its answers are grounded in the geometry (issue 10, part 1).

For each kind of input (32 seeded images each) it asks "What shape is in the image?" and prints how
the answers spread over circle / square / triangle / cross / none (each image's most probable of the
five), with the accuracy where the truth is known.

    python benchmarks/grounding.py                          # toy-shapes and toy-shapes-v1
    python benchmarks/grounding.py --models toy-shapes --n 64
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from mimic_plugins.toy_shapes import shapes
from mimic_plugins.toy_shapes.evaluation import CHECK_QUESTIONS, answer_probability
from mimic_toolkit.engine import load_model

ANSWERS = (*shapes.SHAPES, "none")


def _flat(values, n, rng):
    picks = rng.integers(len(values), size=n)
    return np.stack([np.broadcast_to(np.array(values[k], dtype=np.float32), (shapes.SIZE, shapes.SIZE, 3)) for k in picks])


def _styled(style, n, rng):
    labels = rng.integers(0, shapes.NO_SHAPE, n)
    return np.stack([shapes.render(*shapes.split_class(k), rng, style) for k in labels]), labels


def inputs(n: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """kind -> (images [n, 3, 64, 64] in [0, 1], true shape index per image or None: no shape)."""
    rng = np.random.default_rng((seed, 77))
    size = (n, shapes.SIZE, shapes.SIZE, 3)
    kinds = {
        "flat grey, black or white": (_flat([(0.5,) * 3, (0.0,) * 3, (1.0,) * 3], n, rng), None),
        "flat saturated colour (a red, green, ... frame)": (_flat(list(shapes.COLOUR_RGB.values()), n, rng), None),
        "the generator's backgrounds, no shape": (np.stack([shapes.background(rng) for _ in range(n)]), None),
        "uniform pixel noise": (rng.uniform(0, 1, size).astype(np.float32), None),
        "grey + N(0, 0.1)": (np.clip(0.5 + rng.normal(0, 0.1, size), 0, 1).astype(np.float32), None),
    }
    for style in ("filled", "outline", "blurred", "noisy", "faint"):
        images, labels = _styled(style, n, rng)
        kinds[f"shapes: {style}"] = (images, labels // len(shapes.COLOURS))
    images, labels = _styled("filled", n, rng)
    small = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), size=16, mode="bilinear", antialias=True)
    kinds["shapes blurred to 16 px and back"] = (F.interpolate(small, size=shapes.SIZE, mode="bilinear")
                                                 .permute(0, 2, 3, 1).numpy(), labels // len(shapes.COLOURS))
    return {kind: (torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().contiguous(),
                   None if truth is None else torch.as_tensor(truth))
            for kind, (images, truth) in kinds.items()}


@torch.no_grad()
def answers(adapter, images: torch.Tensor) -> torch.Tensor:
    """Per image, the index in ANSWERS of its most probable answer to the shape question."""
    known = [a for a in ANSWERS if a in adapter.tokenizer.get_vocab()]  # the first toy has no "none"
    p = torch.stack([answer_probability(adapter, images, CHECK_QUESTIONS["shape"], a) for a in known], dim=1)
    return torch.tensor([ANSWERS.index(known[k]) for k in p.argmax(1).tolist()])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="toy-shapes,toy-shapes-v1")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = inputs(args.n)
    table = {}
    for model in args.models.split(","):
        adapter = load_model(model, device="cpu")
        for kind, (images, truth) in data.items():
            picked = answers(adapter, images)
            spread = {a: (picked == k).float().mean().item() for k, a in enumerate(ANSWERS)}
            right = (picked == (truth if truth is not None else ANSWERS.index("none"))).float().mean().item()
            table.setdefault(kind, {})[model] = {"right": right, "answers": spread}
            print(json.dumps({"model": model, "input": kind, "right": right, "answers": spread}), flush=True)
    models = args.models.split(",")
    print(f"\n| input ({args.n} images each) | " + " | ".join(f"{m}: right; answers c/s/t/x/none" for m in models) + " |")
    print("|---|" + "---|" * len(models))
    for kind, row in table.items():
        cells = [f"{row[m]['right']:.0%}; " + "/".join(f"{v:.0%}" for v in row[m]["answers"].values()) for m in models]
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
