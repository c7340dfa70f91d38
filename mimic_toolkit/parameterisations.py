"""What the optimiser moves, as values: the pixels themselves (the paper's), a 1/f^D-scaled Fourier
spectrum behind a sigmoid (lucid's: smooth, large structures), or a lower-resolution image
upsampled (coarse structure only). Each makes its starting latent from the inversion's seeded
generator and turns the latent into normalised images in the model's pixel box."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import PARAMETERISATION_HELP as HELP
from .errors import UserError



@dataclass(frozen=True)
class Pixel:
    """The latent is the image; it is clamped into the pixel box after every step."""
    latent_is_image = True

    def start(self, shape, init: str, generator, box) -> torch.Tensor:
        low, high = box
        if init == "noise":
            return torch.randn(shape, generator=generator).to(low.device).clamp(low, high)
        return low.expand(shape).clone()  # black

    def images(self, latent, box, side: int) -> torch.Tensor:
        return latent

    def after_step(self, latent, box) -> None:
        with torch.no_grad():
            latent.clamp_(*box)


@dataclass(frozen=True)
class Fourier:
    """A spectrum [B, 3, H, W//2+1, 2] scaled by 1/frequency**decay, through a sigmoid; blank = mid
    grey. A steeper decay moves the low frequencies further per step than the high ones: larger,
    smoother regions (lucid's `decay_power`; 1 is lucid's default)."""
    decay: float = 1.0
    latent_is_image = False

    def start(self, shape, init, generator, box):
        b, c, side, _ = shape
        latent = torch.zeros(b, c, side, side // 2 + 1, 2)
        if init == "noise":
            latent = 0.01 * torch.randn(latent.shape, generator=generator)
        return latent.to(box[0].device)

    def images(self, latent, box, side):
        low, high = box
        scale = _spectrum_scale(side, self.decay, latent.device)
        x = torch.fft.irfft2(torch.view_as_complex(latent) * scale, s=(side, side), norm="ortho") / 4  # lucid's scaling
        return low + (high - low) * torch.sigmoid(x)

    def after_step(self, latent, box):
        pass  # the sigmoid keeps every image in the box


@dataclass(frozen=True)
class LowRes:
    """An image `factor` times smaller per side, upsampled bilinearly, through a sigmoid."""
    factor: int
    latent_is_image = False

    def start(self, shape, init, generator, box):
        b, c, side, _ = shape
        small = (b, c, max(1, side // self.factor), max(1, side // self.factor))
        latent = torch.randn(small, generator=generator) if init == "noise" else torch.zeros(small)
        return latent.to(box[0].device)

    def images(self, latent, box, side):
        low, high = box
        up = F.interpolate(latent, size=(side, side), mode="bilinear", align_corners=False)
        return low + (high - low) * torch.sigmoid(up)

    def after_step(self, latent, box):
        pass


@functools.lru_cache(maxsize=8)
def _spectrum_scale(side: int, decay: float, device: torch.device) -> torch.Tensor:
    """1 / frequency**decay per spectrum entry [side, side // 2 + 1]: made once per side, decay and
    device, not every step."""
    fy, fx = torch.fft.fftfreq(side, device=device)[:, None], torch.fft.rfftfreq(side, device=device)
    return 1 / (fx ** 2 + fy ** 2).sqrt().clamp_min(1 / side) ** decay


def parse(spec: str):
    name, _, arg = spec.partition(":")
    if name == "pixel" and not arg:
        return Pixel()
    if name == "fourier":
        try:
            decay = float(arg) if arg else 1.0
        except ValueError:
            decay = 0.0  # not a number: refused below, like any decay out of range
        if 0 < decay <= 3:
            return Fourier(decay)
    if name == "lowres" and arg.isdigit() and int(arg) >= 1:
        return LowRes(int(arg))
    raise UserError(f"parameterisation must be {HELP}; not '{spec}'")
