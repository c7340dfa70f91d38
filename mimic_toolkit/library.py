"""The library front door: the commands' main jobs as functions, for notebooks and scripts.

    import mimic_toolkit as mt

    adapter = mt.load_model("llava-llama3", checkpoint="/models/llava-llama-3-8b")
    stats = mt.compute_stats(adapter, "data/pretzel", class_index=932).save("stats")
    run = mt.invert(adapter, class_index=932, stats=stats, iterations=500)
    run.images, run.metrics[-1]["p_answer"], run.folder

Each function is the same code path as its command (`mimic invert`, `mimic stats`, `mimic capture`),
with the same checks; settings are `InversionConfig`'s fields, as in a `--config` file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .adapter.vision import image_tensor
from .features import FeatureStats
from .features import compute_stats as _compute_stats
from .jsonfile import read_json_lines
from .registry import default_registry


@dataclass
class InversionRun:
    folder: Path  # the completed run folder (config, manifest, metrics, images, report)
    images: torch.Tensor  # the final images, [B, 3, H, W] in [0, 1]
    metrics: list[dict]  # every logged step, as in metrics.jsonl


def invert(adapter, *, registry=None, **settings) -> InversionRun:
    """Invert with a loaded adapter: `settings` are any `mimic invert` settings (`question=`,
    `answer=`, `class_index=`, `stats=`, `iterations=`, `scales={"feature": 0.0}`, `outputs=`, ...),
    on top of the model's defaults."""
    from .session import build_config, run_inversion

    registry = registry or adapter.registry or default_registry()
    given = {key: str(value) if isinstance(value, os.PathLike) else value for key, value in settings.items()}
    config = build_config(registry, {"model": adapter.model_id, "checkpoint": adapter.checkpoint, **given})
    folder = run_inversion(registry, config, adapter=adapter)
    images = torch.stack([image_tensor(Image.open(path).convert("RGB"))
                          for path in sorted((folder / "images").glob("*.png"))])
    return InversionRun(folder, images, read_json_lines(folder / "metrics.jsonl"))


def compute_stats(adapter, images: str | os.PathLike, **options) -> FeatureStats:
    """Feature statistics of a folder of real images (`class_index=`, `feature_sites=`,
    `batch_size=`, `resolution=`); `.save(folder)` writes them and returns the file's path."""
    return _compute_stats(adapter, adapter.model_id, images, **options)


def capture(adapter, *, site: str, tokens: str, images: str | os.PathLike | None = None,
            dataset: str | os.PathLike | None = None, question: str | None = None, out: str | os.PathLike,
            **options):
    """Hidden states of LM `site` at the `tokens` positions (as `mimic capture --tokens`) for a
    folder of images or a dataset file, written to the features folder `out`; returns it loaded."""
    from .lm_capture import Features, Selector, capture as run_capture, load_samples

    samples = load_samples(images, dataset, question)
    folder = run_capture(adapter, adapter.model_id, samples, site, Selector.parse(tokens), Path(out),
                         checkpoint=adapter.checkpoint or "", **options)
    return Features.load(folder)
