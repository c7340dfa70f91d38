"""An independent judge of inverted images: a small CNN (not the VLM) that names shape and colour.

    mimic toy train-verifier   # writes plugins/toy_shapes/verifier.safetensors
"""

import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mimic_toolkit.atomic import atomic_file

from . import shapes

WEIGHTS = Path(__file__).with_name("verifier.safetensors")
TRAIN_STREAM, HELD_OUT_STREAM = 10, 11  # image streams of their own, apart from the VLM's


def _block(inputs: int, outputs: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU())


class Verifier(nn.Module):
    """Four conv blocks down to 4x4, global average pool, one head for shape and one for colour."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            _block(3, 16, stride=2), _block(16, 32), nn.MaxPool2d(2), _block(32, 64), nn.MaxPool2d(2),
            _block(64, 64), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.shape_head = nn.Linear(64, len(shapes.SHAPES))
        self.colour_head = nn.Linear(64, len(shapes.COLOURS))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 3, 64, 64] in [0, 1] -> shape logits [B, 4], colour logits [B, 6]."""
        features = self.features(images * 2 - 1)
        return self.shape_head(features), self.colour_head(features)


def _labels(classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return classes // len(shapes.COLOURS), classes % len(shapes.COLOURS)


@torch.no_grad()
def accuracy(model: Verifier, *, seed: int = 0, n: int = 1000) -> dict[str, float]:
    """Held-out accuracy on fresh images: shape, colour and both right."""
    images, classes = shapes.sample((seed, HELD_OUT_STREAM), n)
    shape_probs, colour_probs = predict(images, model)
    shape_right = shape_probs.argmax(-1) == _labels(classes)[0]
    colour_right = colour_probs.argmax(-1) == _labels(classes)[1]
    return {"shape": shape_right.float().mean().item(), "colour": colour_right.float().mean().item(),
            "both": (shape_right & colour_right).float().mean().item()}


def train_verifier(out_path=WEIGHTS, *, seed: int = 0, steps: int = 1200, batch: int = 64, lr: float = 3e-3) -> dict:
    """Train on fresh images each step (AdamW, cosine), save the weights, return held-out accuracy."""
    torch.manual_seed(seed)
    model = Verifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    for step in range(steps):
        images, classes = shapes.sample((seed, TRAIN_STREAM, step), batch)
        shape_logits, colour_logits = model(images)
        shape_labels, colour_labels = _labels(classes)
        loss = F.cross_entropy(shape_logits, shape_labels) + F.cross_entropy(colour_logits, colour_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 100 == 0:
            print(f"verifier {step:5d} loss {loss.item():.3f}", flush=True)
    model.eval()
    with atomic_file(out_path) as partial:
        save_file(model.state_dict(), str(partial))
    return accuracy(model)


def load_verifier(path=WEIGHTS) -> Verifier:
    model = Verifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@functools.cache
def _shared() -> Verifier:
    return load_verifier()


@torch.no_grad()
def score_concept(images: torch.Tensor, class_index: int, class_name: str) -> dict[str, float] | None:
    """The fraction of images [B, 3, H, W] in [0, 1] whose shape, colour and both the verifier
    names right, if the concept is one of the 24 (its index and its name agree); else None."""
    if not 0 <= class_index < len(shapes.SHAPES) * len(shapes.COLOURS) or class_name != shapes.class_name(class_index):
        return None
    if images.shape[-2:] != (shapes.SIZE, shapes.SIZE):  # the verifier was trained on the generator's size
        images = F.interpolate(images.float(), size=(shapes.SIZE, shapes.SIZE), mode="bilinear", antialias=True)
    shape_probs, colour_probs = predict(images, _shared())
    shape, colour = shapes.split_class(class_index)
    shape_right = shape_probs.argmax(-1) == shapes.SHAPES.index(shape)
    colour_right = colour_probs.argmax(-1) == shapes.COLOURS.index(colour)
    return {"shape": shape_right.float().mean().item(), "colour": colour_right.float().mean().item(),
            "both": (shape_right & colour_right).float().mean().item()}


@torch.no_grad()
def predict(images: torch.Tensor, model: Verifier | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B, 3, 64, 64] in [0, 1] -> (shape probabilities [B, 4], colour probabilities [B, 6])."""
    model = model or load_verifier()
    shape_logits, colour_logits = model(images.float())
    return shape_logits.softmax(-1), colour_logits.softmax(-1)

