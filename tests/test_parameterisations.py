"""What the optimiser moves, as values: each parameterisation keeps its images in the model's
pixel box, learns, and resumes bit-identically; a bad name is one line."""
import copy

import pytest
import torch

from mimic_toolkit.errors import UserError
from mimic_toolkit.parameterisations import Fourier, LowRes, parse
from test_invert import make


def test_names_parse_and_a_bad_one_is_one_line():
    assert parse("lowres:4") == LowRes(4)
    assert parse("fourier") == Fourier(1.0) and parse("fourier:1.5") == Fourier(1.5)
    for bad in ("lowres", "lowres:0", "fourier:0", "fourier:4", "fourier:x", "fourier:nan", "wavelet"):
        with pytest.raises(UserError, match="parameterisation must be"):
            parse(bad)


@pytest.mark.parametrize("name", ["pixel", "fourier", "fourier:1.5", "lowres:4"])
def test_each_parameterisation_stays_in_the_box_learns_and_resumes(tiny_llava, name):
    settings = dict(parameterisation=name, jitter=0, flip=False, lr=0.1 if name == "pixel" else 0.05)
    inversion = make(tiny_llava, **settings)
    low, high = tiny_llava.pixel_box()
    assert inversion.images.shape == (2, 3, 32, 32)
    first = inversion.run_step(want_metrics=True)["terms"]["main"]
    for _ in range(20):
        inversion.run_step()
    state = copy.deepcopy(inversion.state_dict())
    last = inversion.run_step(want_metrics=True)["terms"]["main"]
    assert last < first
    assert bool(((inversion.images >= low) & (inversion.images <= high)).all())
    again = make(tiny_llava, **settings)
    again.load_state_dict(state)
    again.run_step()
    assert torch.equal(again.images, inversion.images)


def test_a_low_resolution_image_holds_only_coarse_structure(tiny_llava):
    images = make(tiny_llava, parameterisation="lowres:8", jitter=0, flip=False).images
    blocks = images.unfold(2, 8, 8).unfold(3, 8, 8)  # 4 x 4 blocks of 8 x 8 pixels
    inside = (blocks - blocks.mean((-1, -2), keepdim=True)).abs().mean()
    assert inside < 0.5 * (images - images.mean((-1, -2), keepdim=True)).abs().mean()


def test_a_steeper_fourier_decay_gives_smoother_images_from_the_same_spectrum():
    box = (torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    latent = torch.randn(2, 3, 32, 17, 2, generator=torch.Generator().manual_seed(0))
    def roughness(decay):  # neighbour differences against the spread: high frequencies' share
        images = Fourier(decay).images(latent, box, 32)
        return (images.diff(dim=-1).abs().mean() / (images - images.mean((-1, -2), keepdim=True)).abs().mean()).item()
    assert roughness(2.0) < roughness(1.5) < 0.8 * roughness(1.0)
