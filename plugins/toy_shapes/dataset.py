"""Files of generated images for the commands that read real ones: an image folder
(`mimic stats --images`) and a dataset in the capture format (`mimic capture`, `mimic icl`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from mimic_toolkit.atomic import atomic_folder, refuse_existing
from mimic_toolkit.errors import UserError

from . import shapes

IMAGES_STREAM, DATASET_STREAM = 31, 32  # seed streams of their own: never training's images


def write_images(out, *, n: int, seed: int = 0, class_index: int | None = None, style: str = "filled") -> Path:
    """`n` PNGs of one concept (`class_index`, 0-23) or of random ones, drawn in `style` (one of
    shapes.STYLES), into the new folder `out`."""
    _check(out, n)
    if class_index is not None and not 0 <= class_index < len(shapes.SHAPES) * len(shapes.COLOURS):
        raise UserError(f"--class-index must be from 0 to 23 (the toy's concepts), not {class_index}")
    if style not in shapes.STYLES:
        raise UserError(f"--style must be one of {', '.join(shapes.STYLES)}, not '{style}'")
    rng = np.random.default_rng((seed, IMAGES_STREAM, 0 if class_index is None else class_index + 1))
    with atomic_folder(out) as folder:
        for i in range(n):
            label = class_index if class_index is not None else int(rng.integers(0, 24))
            _save(shapes.render(*shapes.split_class(label), rng, style), folder / f"{i:05d}.png")
    return Path(out)


def write_dataset(out, *, n: int, seed: int = 0, kind: str = "describe", question: str | None = None,
                  answer: str | None = None, stream: int = DATASET_STREAM, file_name: str = "dataset.jsonl") -> Path:
    """`n` random images and `dataset.jsonl` (image, question, answer, id, labels) into the new
    folder `out`. `kind` picks the generator's question and answer (shape, colour, describe);
    `question` replaces the question's words, `answer` (shape | colour | describe) what is answered.
    `stream` picks the images (another command's datasets draw from streams of their own)."""
    _check(out, n)
    kinds = ("shape", "colour", "describe")
    for name, value in (("--kind", kind), ("--answer", answer)):
        if value is not None and value not in kinds:
            raise UserError(f"{name} must be {', '.join(kinds)}, not '{value}'")
    images, labels = shapes.sample((seed, stream), n)
    rng = np.random.default_rng((seed, stream, 1))
    with atomic_folder(out) as folder:
        (folder / "images").mkdir()
        lines = []
        for i, (image, label) in enumerate(zip(images, labels.tolist())):
            name = f"images/{i:05d}.png"
            _save(image.permute(1, 2, 0).numpy(), folder / name)
            asked, answered = shapes.question_answer(kind, label, rng)
            if answer:
                answered = shapes.question_answer(answer, label, rng)[1]
            shape, colour = shapes.split_class(label)
            lines.append(json.dumps({"id": f"{i:05d}", "image": name, "question": question or asked,
                                     "answer": answered, "labels": {"shape": shape, "colour": colour}}))
        (folder / file_name).write_text("\n".join(lines) + "\n")
    return Path(out) / file_name


def _check(out, n: int) -> None:
    if n < 1:
        raise UserError(f"--n must be at least 1, not {n}")
    refuse_existing(Path(out), "--out")


def _save(pixels: np.ndarray, path: Path) -> None:
    Image.fromarray((pixels * 255).round().astype(np.uint8)).save(path)
