"""An independent judge of inverted images: a small CNN (not the VLM) that names shape and colour.

It trains only on generator images, in all the styles of `shapes.STYLES` that have a shape, and
half of each batch with one of the defects inverted images have (`CORRUPTIONS`: speckle, pixel
noise, blur, ragged edges, halos), so it judges an inversion's shape, not its texture.

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
from mimic_toolkit.transforms import gaussian_blur

from . import shapes

WEIGHTS = Path(__file__).with_name("verifier.safetensors")
TRAIN_STREAM, HELD_OUT_STREAM = 10, 11  # image streams of their own, apart from the VLM's
SHAPE_STYLES = {style: weight for style, weight in shapes.GROUNDED_MIX.items() if style not in shapes.NO_SHAPE_STYLES}


def _speckle(images, g):
    """A few percent of the pixels set to random colours."""
    hit = torch.rand(images.shape[0], 1, *images.shape[2:], generator=g) < 0.02 + 0.08 * torch.rand(1, generator=g)
    return torch.where(hit, torch.rand(images.shape, generator=g), images)


def _noise(images, g):
    return images + torch.randn(images.shape, generator=g) * (0.05 + 0.15 * torch.rand(1, generator=g))


def _blur(images, g):
    return gaussian_blur(images, 0.5 + 1.5 * torch.rand(1, generator=g).item())


def _ragged(images, g):
    """Pixels moved by a rough random field of up to ~2 px, so every edge frays."""
    size = images.shape[-1]
    field = F.interpolate(torch.randn(images.shape[0], 2, size // 4, size // 4, generator=g), size=(size, size),
                          mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    identity = F.affine_grid(torch.eye(2, 3).expand(images.shape[0], 2, 3), images.shape, align_corners=False)
    return F.grid_sample(images, identity + field * (2.0 / size) * (1 + torch.rand(1, generator=g)),
                         padding_mode="reflection", align_corners=False)


def _halo(images, g):
    """A glow of the image's own colours around every object."""
    glow = gaussian_blur(images, 2 + 2 * torch.rand(1, generator=g).item())
    return torch.maximum(images, glow * (0.6 + 0.4 * torch.rand(1, generator=g)))


# The defects inverted images show; applied to half of each training batch (still generator images).
CORRUPTIONS = {"speckle": _speckle, "noise": _noise, "blur": _blur, "ragged": _ragged, "halo": _halo}


def corrupt(images: torch.Tensor, name: str, g: torch.Generator) -> torch.Tensor:
    return CORRUPTIONS[name](images, g).clamp(0, 1)


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


def _right(model: Verifier, images: torch.Tensor, classes: torch.Tensor) -> dict[str, float]:
    shape_probs, colour_probs = predict(images, model)
    shape_right = shape_probs.argmax(-1) == _labels(classes)[0]
    colour_right = colour_probs.argmax(-1) == _labels(classes)[1]
    return {"shape": shape_right.float().mean().item(), "colour": colour_right.float().mean().item(),
            "both": (shape_right & colour_right).float().mean().item()}


@torch.no_grad()
def accuracy(model: Verifier, *, seed: int = 0, n: int = 1000) -> dict[str, dict[str, float]]:
    """Held-out accuracy (shape, colour, both right) on fresh filled shapes ("clean"), on each
    corruption of them and on each other drawing style."""
    images, classes = shapes.sample((seed, HELD_OUT_STREAM), n)
    g = torch.Generator().manual_seed(seed)
    table = {"clean": _right(model, images, classes)}
    table.update({name: _right(model, corrupt(images, name, g), classes) for name in CORRUPTIONS})
    for k, style in enumerate(SHAPE_STYLES):
        if style != "filled":
            styled, styled_classes, _ = shapes.sample((seed, HELD_OUT_STREAM, k), n, {style: 1.0})
            table[style] = _right(model, styled, styled_classes)
    return table


def train_verifier(out_path=WEIGHTS, *, seed: int = 0, steps: int = 3000, batch: int = 64, lr: float = 3e-3) -> dict:
    """Train on fresh images each step (AdamW, cosine), save the weights, return held-out accuracy."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = Verifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    names = list(CORRUPTIONS)
    for step in range(steps):
        images, classes, _ = shapes.sample((seed, TRAIN_STREAM, step), batch, SHAPE_STYLES)
        half = batch // 2  # the first half of the batch gets one defect, the rest stays as drawn
        images = torch.cat([corrupt(images[:half], names[step % len(names)], g), images[half:]])
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

