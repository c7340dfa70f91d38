"""The objective terms of MIMIC (Jain & Stergiou, 2025), each a function of the step.

L = main * CE + feature * L_base + patch * R_patch + tv_l1 * TV_L1 + tv_l2 * TV_L2 + l2 * L2
(+ guide * R_V, the guide network's BatchNorm prior, `guides.py`; + lm * the --objective direction
inside the language model, instead of the answer).
A term whose scale is 0 is not computed at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .specs import ObjectiveSpec


@dataclass
class StepContext:
    """What a term may look at in one step.

    pixels: the model's input this step (after the transforms: views x batch images), normalised, [B, 3, H, W], fp32.
    logits: [B, n_target, vocab] fp32, the logits that predict each target token.
    targets: [n_target] target token ids.
    features: site -> (mean [B, D], var [B, D]) of the vision tower's activations over tokens.
    stats: site -> (mean [D], var [D]) targets, or None when no statistics were given.
    patch_size: the vision tower's patch size in pixels.
    feature_form: "l2" (the paper's L_base) or "kl".
    hidden: LM site -> [B, L, D] hidden states, for the sites the "lm" term's objective reads.
    lm_objective: hidden -> loss, the --objective (see lm_objective.py), or None.
    normalisation: the model's input normalisation (mean, std), [3, 1, 1] each: pixels * std + mean
        are the images in [0, 1].
    guide: images in [0, 1] -> R_V, the run's guide network (`guides.Guide`), or None.
    """

    pixels: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    features: dict[str, tuple[torch.Tensor, torch.Tensor]]
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None
    patch_size: int
    feature_form: str = "l2"
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)
    lm_objective: Callable[[dict], torch.Tensor] | None = None
    normalisation: tuple[torch.Tensor, torch.Tensor] | None = None
    guide: Callable[[torch.Tensor], torch.Tensor] | None = None


def answer_ce(ctx: StepContext) -> torch.Tensor:
    """Teacher-forced cross-entropy of the target tokens, mean over tokens and images."""
    batch = ctx.logits.shape[0]
    return F.cross_entropy(ctx.logits.flatten(0, 1), ctx.targets.repeat(batch))


def feature_statistics(ctx: StepContext) -> torch.Tensor:
    """mean_b sum_sites ||mu_b - mu*||_2 + ||var_b - var*||_2 (or the per-channel KL form)."""
    if ctx.stats is None:
        raise ValueError("the feature-statistics term needs --stats (or set its scale to 0)")
    total = 0.0
    for site, (mean, var) in ctx.features.items():
        target_mean, target_var = ctx.stats[site]
        if ctx.feature_form == "kl":
            total = total + gaussian_kl(mean, var, target_mean, target_var).sum(-1)
        else:
            total = total + (mean - target_mean).norm(dim=-1) + (var - target_var).norm(dim=-1)
    return total.mean()


def gaussian_kl(mean, var, target_mean, target_var, floor: float = 1e-6):
    """KL(N(mean, var) || N(target_mean, target_var)) per channel."""
    var, target_var = var.clamp_min(floor), target_var.clamp_min(floor)
    return 0.5 * (torch.log(target_var / var) + (var + (mean - target_mean) ** 2) / target_var - 1)


def patch_prior(ctx: StepContext) -> torch.Tensor:
    """Mean squared jump across the seams between adjacent P x P patches, summed over both seam
    directions, mean over the batch."""
    x, p = ctx.pixels, ctx.patch_size  # H and W are multiples of p (checked when configuring)
    below = x[:, :, p::p, :] - x[:, :, p - 1:-1:p, :]  # first row of a patch - last row above it
    right = x[:, :, :, p::p] - x[:, :, :, p - 1:-1:p]
    return below.pow(2).mean() + right.pow(2).mean()


def _neighbour_differences(x: torch.Tensor):
    """Differences to the right, below, and along both diagonals."""
    return (x[..., :, 1:] - x[..., :, :-1],
            x[..., 1:, :] - x[..., :-1, :],
            x[..., 1:, 1:] - x[..., :-1, :-1],
            x[..., 1:, :-1] - x[..., :-1, 1:])


def tv_l1(ctx: StepContext) -> torch.Tensor:
    return sum(d.abs().mean() for d in _neighbour_differences(ctx.pixels))


def tv_l2(ctx: StepContext) -> torch.Tensor:
    return sum(d.pow(2).mean() for d in _neighbour_differences(ctx.pixels))


def l2_norm(ctx: StepContext) -> torch.Tensor:
    """mean_b ||x_b||_2 / (C*H*W)."""
    x = ctx.pixels
    return (x.flatten(1).norm(dim=1) / x[0].numel()).mean()


def lm_direction(ctx: StepContext) -> torch.Tensor:
    """Minus the projection of an LM site's hidden state on the --objective direction."""
    if ctx.lm_objective is None:
        raise ValueError("the lm term needs --objective (or set its scale to 0)")
    return ctx.lm_objective(ctx.hidden)


def guide_prior(ctx: StepContext) -> torch.Tensor:
    """R_V: the guide network's BatchNorm statistics of this step's images (in the guide's own
    normalisation) against its running statistics."""
    if ctx.guide is None:
        raise ValueError("the guide term needs a guide network (--guide; or set its scale to 0)")
    mean, std = ctx.normalisation
    return ctx.guide(ctx.pixels * std + mean)  # not clamped: the pixels stay in the box, the gradient flows


# Default scales are the reference's (LLaVA-Llama-3); each adapter may declare its own.
BUILTIN_TERMS = (
    ObjectiveSpec("main", answer_ce, 0.005, "cross-entropy of the target answer tokens", reads=("answer",)),
    ObjectiveSpec("feature", feature_statistics, 0.04, "vision-tower feature statistics vs. real images",
                  reads=("vision_statistics",)),
    ObjectiveSpec("patch", patch_prior, 5e-4, "smoothness across the ViT patch seams"),
    ObjectiveSpec("tv_l1", tv_l1, 7e-4, "total variation, L1"),
    ObjectiveSpec("tv_l2", tv_l2, 4e-4, "total variation, L2"),
    ObjectiveSpec("l2", l2_norm, 3e-4, "image L2 norm"),
    ObjectiveSpec("guide", guide_prior, 0.0, "R_V: a guide CNN's BatchNorm statistics vs. its running ones "
                  "(--guide; MIMIC's reference: 0.004)", reads=("guide",)),
    ObjectiveSpec("lm", lm_direction, 0.0, "a direction inside the LM (--objective; then on, and main off)",
                  reads=("lm_objective",)),
)
