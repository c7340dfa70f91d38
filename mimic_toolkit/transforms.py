"""Augmentations of the images before the model sees them, as values composed from a spec
(`--transforms "crop:0.3-1,shift:4,flip,colour:0.1"`), all drawn from the inversion's one seeded
CPU generator, so a resumed run draws what an uninterrupted one would.

With `--views N` every image is augmented N times per step and the losses are averaged over the
views (an augmentation ensemble, as in Plug-In Inversion, Ghiasi et al. 2022): an image must give
the answer under every view, which favours whole objects over pixel patterns one view exploits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import TRANSFORMS_HELP as HELP
from .errors import UserError


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """A separable Gaussian blur of [B, C, H, W] (reflect-padded), radius 2.5 sigma."""
    radius = max(1, math.ceil(2.5 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, device=images.device) / sigma) ** 2)
    taps = (taps / taps.sum()).to(images.dtype)
    channels = images.shape[1]
    padded = F.pad(images, (radius,) * 4, mode="reflect")
    rows = F.conv2d(padded, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(rows, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def _filled_with_mean(images: torch.Tensor, move) -> torch.Tensor:
    """`move(images)` for a move that fills what it uncovers with zeros, with each image's own mean
    colour there instead. Not a reflection: a reflected half-object at the border reads as a whole
    one, which let inversions park their objects on the border, cut in half (RESULTS.md, "Padding by
    the mean colour")."""
    fill = images.mean(dim=(2, 3), keepdim=True)
    return move(images - fill) + fill


@dataclass(frozen=True)
class Shift:
    """A move by up to +-J px each way, padded with the image's mean colour."""
    pixels: int

    def __call__(self, images: torch.Tensor, generator: torch.Generator, box) -> torch.Tensor:
        j = self.pixels
        if not j:
            return images
        dx, dy = torch.randint(0, 2 * j + 1, (2,), generator=generator).tolist()
        side = images.shape[-1]
        padded = _filled_with_mean(images, lambda x: F.pad(x, (j,) * 4))
        return padded[:, :, dy:dy + side, dx:dx + side].contiguous()  # one layout for every offset


@dataclass(frozen=True)
class Flip:
    def __call__(self, images, generator, box):
        return images.flip(-1) if torch.rand((), generator=generator) < 0.5 else images


@dataclass(frozen=True)
class Crop:
    """A region of `low`..`high` of the area (aspect 3/4..4/3, narrowed until it fits) resized
    back to the full side."""
    low: float
    high: float

    def __call__(self, images, generator, box):
        side = images.shape[-1]
        area, aspect = torch.rand(2, generator=generator).tolist()
        area = self.low + (self.high - self.low) * area
        aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * aspect)
        aspect = min(max(aspect, area), 1 / area)  # a box of this area fits inside the image
        h = min(side, max(1, round(side * math.sqrt(area / aspect))))
        w = min(side, max(1, round(side * math.sqrt(area * aspect))))
        top, left = (torch.randint(0, side - n + 1, (), generator=generator).item() for n in (h, w))
        region = images[:, :, top:top + h, left:left + w]
        return F.interpolate(region, size=(side, side), mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class Colour:
    """Per channel x' = low + gain * (x - low) + offset, gain in 1 +- S, offset +- S of the range."""
    strength: float

    def __call__(self, images, generator, box):
        low, high = box
        draws = (self.strength * (2 * torch.rand(2, 1, 3, 1, 1, generator=generator) - 1)).to(images.device)
        gain, offset = 1 + draws[0], draws[1]
        return low + gain * (images - low) + offset * (high - low)


@dataclass(frozen=True)
class Blur:
    """A Gaussian blur of sigma 0..S px: the model sees no detail finer than the view allows, so
    pixel-level patterns get no gradient and the image priors clear them."""
    sigma: float

    def __call__(self, images, generator, box):
        sigma = self.sigma * torch.rand((), generator=generator).item()
        return gaussian_blur(images, sigma) if sigma > 0.1 else images


@dataclass(frozen=True)
class Rotate:
    """A turn by up to +-D degrees about the centre, the corners filled with the image's mean
    colour: most objects keep their name at any angle, so the answer must not hang on one
    orientation's pixels."""
    degrees: float

    def __call__(self, images, generator, box):
        turn = math.radians(self.degrees) * (2 * torch.rand((), generator=generator).item() - 1)
        cos, sin = math.cos(turn), math.sin(turn)
        theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=images.dtype, device=images.device)
        grid = F.affine_grid(theta.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False)
        return _filled_with_mean(images, lambda x: F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                                                                 align_corners=False))


def parse(spec: str) -> tuple:
    """'crop:0.3-1,shift:4,flip,colour:0.1' -> the transforms, applied in that order."""
    out = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, arg = item.partition(":")
        try:
            out.append(_build(name, arg))
        except ValueError:
            raise UserError(f"transform '{item}' is not one of: {HELP}") from None
    return tuple(out)


def _build(name: str, arg: str):
    if name == "flip" and not arg:
        return Flip()
    if name == "shift":
        pixels = int(arg)
        if pixels < 0:
            raise ValueError
        return Shift(pixels)
    if name == "crop":
        low, high = map(float, arg.split("-"))
        if not 0 < low <= high <= 1:
            raise ValueError
        return Crop(low, high)
    if name == "colour":
        strength = float(arg)
        if not 0 <= strength < 1:
            raise ValueError
        return Colour(strength)
    if name == "blur":
        sigma = float(arg)
        if not 0 < sigma <= 8:
            raise ValueError
        return Blur(sigma)
    if name == "rotate":
        degrees = float(arg)
        if not 0 < degrees <= 180:
            raise ValueError
        return Rotate(degrees)
    raise ValueError


def from_settings(spec: str | None, jitter: int, flip: bool) -> tuple:
    """`--transforms`, or without it the classic pair: shift by `jitter`, then flip."""
    if spec:
        return parse(spec)
    return (Shift(jitter),) + ((Flip(),) if flip else ())


def largest_shift(transforms: tuple) -> int:
    """The widest shift the transforms ask for (it must be smaller than the image)."""
    return max((t.pixels for t in transforms if isinstance(t, Shift)), default=0)


def augment(images: torch.Tensor, transforms: tuple, views: int, generator: torch.Generator, box) -> torch.Tensor:
    """[B, ...] -> [views * B, ...]: each view is the whole batch under its own draw of every transform."""
    out = []
    for _ in range(views):
        view = images
        for transform in transforms:
            view = transform(view, generator, box)
        out.append(view)
    return out[0] if views == 1 else torch.cat(out)
