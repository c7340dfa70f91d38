"""The toy's guide network for the `guide` term (R_V, DeepInversion's BatchNorm prior): a small CNN
with BatchNorm, trained on the generator's images to name the 24 concepts. The term matches the
batch statistics at its BatchNorm layers to the running statistics kept here, so only those have
to describe real images well; the classifier head is what trains them.

    mimic toy train-guide   # writes plugins/toy_shapes/guide.safetensors and guide_training.json
"""
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from mimic_toolkit.atomic import atomic_file, write_file

from . import shapes
from .train import _schedule, train_step

WEIGHTS = Path(__file__).with_name("guide.safetensors")
RECORD = Path(__file__).with_name("guide_training.json")
TRAIN_STREAM, HELD_OUT_STREAM = 20, 21  # image streams of their own (the VLM's and the verifier's are apart)
WIDTHS = (16, 32, 64, 64)


class ToyGuide(nn.Module):
    """Four conv-BatchNorm-ReLU blocks (a 2x max pool after each of the first three: 64 -> 8 px),
    global average pool, a linear head over the 24 concepts. Input: images normalised to [-1, 1]."""

    def __init__(self):
        super().__init__()
        layers, inputs = [], 3
        for i, width in enumerate(WIDTHS):
            layers += [nn.Conv2d(inputs, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            layers += [nn.MaxPool2d(2)] if i < len(WIDTHS) - 1 else []
            inputs = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(inputs, len(shapes.SHAPES) * len(shapes.COLOURS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build() -> ToyGuide:
    """The builder `GuideSpec` names (weights are loaded by the core)."""
    return ToyGuide()


@torch.no_grad()
def accuracy(model: ToyGuide, *, seed: int = 0, n: int = 1000) -> float:
    """Top-1 over the 24 concepts on fresh images of the held-out stream."""
    images, classes = shapes.sample((seed, HELD_OUT_STREAM), n)
    return (model.eval()(images * 2 - 1).argmax(-1) == classes).float().mean().item()


def train_guide(out_path=WEIGHTS, *, seed: int = 0, steps: int = 1200, batch: int = 64, lr: float = 3e-3) -> dict:
    """Fresh generator images every step (AdamW, cosine); writes the weights and, beside them,
    `guide_training.json` (recipe and held-out accuracy); returns that record."""
    torch.manual_seed(seed)
    model, started = ToyGuide(), time.perf_counter()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = _schedule(optimizer, steps, warmup=0)
    for step in range(steps):
        images, classes = shapes.sample((seed, TRAIN_STREAM, step), batch)
        loss = train_step(F.cross_entropy(model(images * 2 - 1), classes), optimizer, scheduler, model.parameters())
        if step % 100 == 0:
            print(f"guide {step:5d} loss {loss:.3f}", flush=True)
    record = {"recipe": {"command": "mimic toy train-guide", "seed": seed, "steps": steps, "batch": batch, "lr": lr,
                         "optimizer": "AdamW (weight decay 1e-4), cosine, gradient clipped at 1",
                         "images": f"shapes.sample((seed, {TRAIN_STREAM}, step), batch): filled shapes"},
              "held_out_top1": round(accuracy(model, seed=seed), 4),
              "held_out": f"1000 images of stream {HELD_OUT_STREAM}, 24 concepts (chance 0.042)",
              "train_seconds": round(time.perf_counter() - started, 1)}
    with atomic_file(out_path) as partial:
        save_file(model.state_dict(), str(partial))
    write_file(Path(out_path).with_name(RECORD.name), json.dumps(record, indent=2) + "\n")
    return record
