"""Each objective term against a value computed by hand on a small tensor."""
import math

import pytest
import torch

from mimic_toolkit import terms
from mimic_toolkit.terms import StepContext


def ctx(pixels=None, **kw):
    base = dict(pixels=pixels if pixels is not None else torch.zeros(1, 1, 2, 2), logits=torch.zeros(1, 1, 2),
                targets=torch.tensor([0]), features={}, stats=None, patch_size=1)
    base.update(kw)
    return StepContext(**base)


def test_answer_ce_matches_log_softmax_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # one image, two target tokens
    value = terms.answer_ce(ctx(logits=logits, targets=torch.tensor([0, 2])))
    first = -(2 - math.log(math.exp(2) + 2))
    second = -(0 - math.log(math.e + 2))
    assert value.item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_feature_statistics_l2_is_unsquared_norms_summed_over_sites_mean_over_images():
    features = {"a": (torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 1.0]])),
                "b": (torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([[1.0, 3.0], [1.0, 1.0]]))}
    stats = {"a": (torch.zeros(2), torch.ones(2)), "b": (torch.zeros(2), torch.ones(2))}
    value = terms.feature_statistics(ctx(features=features, stats=stats))
    # image 0: ||(3,4)|| = 5 at a, ||(0,2)|| = 2 at b; image 1: 0
    assert value.item() == pytest.approx((5 + 2 + 0) / 2)


def test_feature_statistics_kl_form_matches_the_gaussian_kl():
    features = {"a": (torch.tensor([[1.0]]), torch.tensor([[2.0]]))}
    stats = {"a": (torch.tensor([0.0]), torch.tensor([1.0]))}
    value = terms.feature_statistics(ctx(features=features, stats=stats, feature_form="kl"))
    expected = 0.5 * (math.log(1 / 2) + (2 + 1) / 1 - 1)
    assert value.item() == pytest.approx(expected)


def test_feature_statistics_without_targets_says_what_to_do():
    with pytest.raises(ValueError, match="--stats"):
        terms.feature_statistics(ctx(features={"a": (torch.zeros(1, 1), torch.ones(1, 1))}))


def test_patch_prior_compares_only_pixels_across_seams():
    x = torch.zeros(1, 1, 4, 4)
    x[:, :, 2:, :] = 1.0  # a step exactly at the seam between patch rows (P = 2)
    value = terms.patch_prior(ctx(pixels=x, patch_size=2))
    # vertical seams: one row of 4 differences, each 1 -> mean 1; horizontal seams: all 0
    assert value.item() == pytest.approx(1.0)
    y = torch.zeros(1, 1, 4, 4)
    y[:, :, 1:, :] = 1.0  # a step inside a patch: no seam sees it
    assert terms.patch_prior(ctx(pixels=y, patch_size=2)).item() == 0.0


def test_tv_terms_sum_four_directions():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    # right: (1, 2); down: (2, 3); diagonal: (4); anti-diagonal: (2 - 1 = 1)
    assert terms.tv_l1(ctx(pixels=x)).item() == pytest.approx(1.5 + 2.5 + 4 + 1)
    assert terms.tv_l2(ctx(pixels=x)).item() == pytest.approx(2.5 + 6.5 + 16 + 1)


def test_l2_is_norm_over_pixel_count_mean_over_batch():
    x = torch.zeros(2, 1, 2, 2)
    x[0, 0, 0, 0] = 3.0
    x[0, 0, 1, 1] = 4.0
    assert terms.l2_norm(ctx(pixels=x)).item() == pytest.approx((5 / 4 + 0) / 2)


def test_a_term_declares_what_it_reads_and_the_engine_prepares_exactly_that(tiny_llava):
    """The engine never asks a term's name: a plugin term that reads the vision statistics gets the
    tower's feature statistics recorded, one that does not gets none."""
    from mimic_toolkit.config import resolve
    from mimic_toolkit.inversion import ActiveTerm, Inversion
    from mimic_toolkit.specs import ObjectiveSpec

    seen = {}

    def spy(ctx):
        seen["sites"] = sorted(ctx.features)
        return ctx.pixels.mean()

    with pytest.raises(ValueError, match="reads \\['logits'\\]"):
        ObjectiveSpec("bad", spy, reads=("logits",))
    config = resolve([dict(iterations=2, batch_size=1, jitter=0, flip=False, resolution=32)])
    prompt = tiny_llava.build_prompt([("What is in the image?", "red")])
    for reads, recorded in (((), False), (("vision_statistics",), True)):
        with Inversion(tiny_llava, prompt, config, [ActiveTerm.of(ObjectiveSpec("spy", spy, reads=reads), 1.0)]) as inv:
            inv.run_step()
        assert bool(seen["sites"]) == recorded, reads
