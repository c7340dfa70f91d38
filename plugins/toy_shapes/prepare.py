"""Bundled assets of the toy model made from the generator: per-concept feature statistics."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from mimic_toolkit.atomic import atomic_folder, check_replaceable

from . import shapes


def write_concept_stats(out: Path, *, images_per_concept: int = 64, seed: int = 0,
                        model: str = "toy-shapes", checkpoint: str | None = None) -> list[Path]:
    """For each concept, generate images, save them as PNGs and run `mimic stats`'s own code on
    the folder, so the shipped statistics come through the same path as a user's."""
    from mimic_toolkit.engine import load_model
    from mimic_toolkit.features import compute_stats

    check_replaceable(out, lambda folder: all(p.suffix == ".safetensors" for p in folder.iterdir()), "--out")
    adapter = load_model(model, checkpoint=checkpoint, device="cpu")
    written = []
    with atomic_folder(out, replace=True) as partial:  # the old set stays whole until the new one is
        for index in range(len(shapes.SHAPES) * len(shapes.COLOURS)):
            rng = np.random.default_rng((seed, index))
            with tempfile.TemporaryDirectory() as folder:
                for i in range(images_per_concept):
                    pixels = shapes.render(*shapes.split_class(index), rng)
                    Image.fromarray((pixels * 255).round().astype(np.uint8)).save(Path(folder) / f"{i:03d}.png")
                stats = compute_stats(adapter, adapter.model_id, folder, class_index=index)
            written.append(stats.save(partial).name)
    return [out / name for name in written]
