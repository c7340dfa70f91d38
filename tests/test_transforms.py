"""Augmentations as values (`--transforms`) over the inversion's one seeded generator, and
augmentation ensembles (`--views`): what each transform does, that the default is the classic
shift-and-flip exactly, and that a run with an ensemble learns and resumes bit-identically."""
import copy

import pytest
import torch

from mimic_toolkit import transforms
from mimic_toolkit.errors import UserError
from test_invert import make

BOX = (torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))


def test_the_spec_parses_into_values_in_order_and_a_bad_item_is_one_line():
    parsed = transforms.parse("crop:0.3-1, shift:4,flip,colour:0.1")
    assert parsed == (transforms.Crop(0.3, 1.0), transforms.Shift(4), transforms.Flip(), transforms.Colour(0.1))
    assert transforms.largest_shift(parsed) == 4
    assert transforms.parse("blur:1.5,rotate:30") == (transforms.Blur(1.5), transforms.Rotate(30.0))
    for bad in ("crop:0.5", "crop:0-1", "shift:-1", "colour:1.5", "rotate:0", "rotate:200", "spin:10", "flip:2",
                "blur:0", "blur:x"):
        with pytest.raises(UserError, match=f"transform '{bad}' is not one of"):
            transforms.parse(bad)


def test_each_transform_keeps_the_shape_and_draws_only_from_the_generator():
    images = torch.rand(2, 3, 16, 16)
    for transform in transforms.parse("crop:0.3-0.6,shift:3,flip,colour:0.2,blur:2,rotate:45"):
        a = transform(images, torch.Generator().manual_seed(1), BOX)
        b = transform(images, torch.Generator().manual_seed(1), BOX)
        assert a.shape == images.shape and torch.equal(a, b)
    assert torch.equal(transforms.Colour(0.0)(images, torch.Generator(), BOX), images)
    full = transforms.Crop(1.0, 1.0)(images, torch.Generator().manual_seed(0), BOX)
    assert torch.allclose(full, images, atol=1e-6)  # the whole image, resized to itself
    # a blur keeps the mean and removes the finest detail: a checkerboard turns nearly flat
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None]).remainder(2).float().expand(1, 3, 16, 16)
    blurred = transforms.gaussian_blur(checker, 1.5)
    assert abs(blurred.mean() - 0.5) < 0.01 and blurred.std() < 0.05 * checker.std()
    # a turn keeps a centred disc where it is and moves an off-centre square, whole, elsewhere
    ys, xs = torch.meshgrid(torch.arange(32) - 15.5, torch.arange(32) - 15.5, indexing="ij")
    disc = ((ys ** 2 + xs ** 2) < 64).float().expand(1, 3, 32, 32)
    square = torch.zeros(1, 3, 32, 32)
    square[..., 8:12, 8:12] = 1
    quarter = transforms.Rotate(90.0)
    for seed in range(20):  # some draw turns by more than 60 degrees
        turned = quarter(torch.cat([disc, square]), torch.Generator().manual_seed(seed), BOX)
        if turned[1, :, 8:12, 8:12].mean() < 0.5:
            break
    else:
        raise AssertionError("no draw of up to 90 degrees moved the square")
    assert (turned[0] - disc[0]).abs().mean() < 0.05
    assert abs((turned[1] > 0.5).sum() - (square > 0.5).sum()) <= 0.1 * (square > 0.5).sum()
    views = transforms.augment(images, transforms.parse("shift:3"), 4, torch.Generator().manual_seed(0), BOX)
    assert views.shape == (8, 3, 16, 16) and not torch.equal(views[:2], views[2:4])  # each view draws anew


def test_a_shift_or_turn_fills_with_the_image_mean_colour_not_a_mirror_of_the_border():
    # an object cut by the left border: a reflection would show the model it whole, twice as wide
    image = torch.zeros(1, 3, 16, 16)
    image[:, 0, 4:12, :4] = 1
    mean = image.mean(dim=(2, 3), keepdim=True)
    seed = next(s for s in range(100) if torch.randint(0, 9, (2,), generator=torch.Generator().manual_seed(s))[0] == 0)
    shifted = transforms.Shift(4)(image, torch.Generator().manual_seed(seed), BOX)  # moved 4 px right
    assert torch.allclose(shifted[..., :4], mean.expand(1, 3, 16, 4))
    assert (shifted[:, 0] == 1).sum() == (image[:, 0] == 1).sum()  # the object moved in whole, unmirrored
    turned = transforms.Rotate(180.0)(image, torch.Generator().manual_seed(2), BOX)
    assert 0.58 < torch.rand((), generator=torch.Generator().manual_seed(2)) < 0.67  # this draw turns by 30-60 degrees
    assert torch.allclose(turned[..., 0, 0], mean[..., 0, 0], atol=1e-6)  # a corner the turn left empty


def test_the_default_is_exactly_shift_by_jitter_then_flip(tiny_llava):
    classic = make(tiny_llava, jitter=3, flip=True)
    spelled = make(tiny_llava, jitter=0, flip=False, transforms="shift:3,flip")
    for _ in range(3):
        classic.run_step()
        spelled.run_step()
    assert torch.equal(classic.images, spelled.images)


def test_an_ensemble_of_views_learns_and_resumes_bit_identically(tiny_llava):
    settings = dict(transforms="crop:0.5-1,shift:2,flip,colour:0.1", views=3, lr=0.1)
    inversion = make(tiny_llava, **settings)
    first = inversion.run_step(want_metrics=True)["terms"]["main"]
    for _ in range(10):
        inversion.run_step()
    state = copy.deepcopy(inversion.state_dict())
    last = inversion.run_step(want_metrics=True)["terms"]["main"]
    assert last < first
    again = make(tiny_llava, **settings)
    again.load_state_dict(state)
    again.run_step()
    assert torch.equal(again.images, inversion.images)
