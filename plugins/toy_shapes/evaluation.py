"""Scores inverted images of the toy model, as the paper scores its images with an independent
classifier: the verifier CNN (trained on the generator, not on the VLM) names shape and colour,
and the VLM itself is asked a question phrased differently from the one that was inverted."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from mimic_toolkit.adapter.vision import image_tensor
from mimic_toolkit.engine import format_prompt, load_model
from mimic_toolkit.errors import UserError

from . import shapes, verifier

CHECK_QUESTIONS = {"shape": "What shape is in the image?", "colour": "What colour is the shape?"}
TOY_MODELS = ("toy-shapes", "toy-shapes-v1")  # the LLaVA toys of the 24 concepts the verifier knows


def run_folders(paths: list[Path]) -> list[Path]:
    """Run folders, given as run folders or sweep folders (which hold c<class>/ runs)."""
    found = []
    for path in paths:
        if (path / "manifest.json").is_file():
            found.append(path)
        elif path.is_dir() and any(path.glob("c*/manifest.json")):
            found += sorted(p.parent for p in path.glob("c*/manifest.json"))
        else:
            raise UserError(f"'{path}' is neither a run folder nor a sweep folder")
    return found


def load_run_images(folder: Path) -> torch.Tensor:
    files = sorted((folder / "images").glob("*.png"))
    if not files:
        raise UserError(f"run '{folder}' has no images")
    return torch.stack([image_tensor(Image.open(f).convert("RGB")) for f in files])


def answer_probability(adapter, images01: torch.Tensor, question: str, answer: str) -> torch.Tensor:
    """P(answer | image, question) under the VLM, per image (product over the answer's tokens)."""
    return adapter.answer_probability(adapter.normalise(images01), format_prompt(adapter, [(question, answer)]))


def run_model(folder: Path) -> str:
    model = json.loads((folder / "manifest.json").read_text()).get("model")
    if model not in TOY_MODELS:
        raise UserError(f"run '{folder}' inverted '{model}': evaluate scores runs of {' or '.join(TOY_MODELS)}")
    return model


def evaluate_run(folder: Path, adapter, classifier) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    index = manifest["concept"]["class_index"]
    if not 0 <= index < len(shapes.SHAPES) * len(shapes.COLOURS):
        raise UserError(f"run '{folder}' did not invert one of the 24 toy concepts (class index {index})")
    shape, colour = shapes.split_class(index)
    images = load_run_images(folder)
    shape_p, colour_p = verifier.predict(images, classifier)
    shape_ok = shape_p.argmax(-1) == shapes.SHAPES.index(shape)
    colour_ok = colour_p.argmax(-1) == shapes.COLOURS.index(colour)
    return {
        "run": str(folder), "class_index": index, "images": len(images),
        "shape_top1": shape_ok.float().mean().item(), "colour_top1": colour_ok.float().mean().item(),
        "both_top1": (shape_ok & colour_ok).float().mean().item(),
        "predicted_shapes": [shapes.SHAPES[i] for i in shape_p.argmax(-1).tolist()],
        "vlm_p_shape": answer_probability(adapter, images, CHECK_QUESTIONS["shape"], shape).mean().item(),
        "vlm_p_colour": answer_probability(adapter, images, CHECK_QUESTIONS["colour"], colour).mean().item(),
    }


def summarise(rows: list[dict]) -> dict:
    """Means over runs, and the shape score a shuffled-target baseline would get: the chance that a
    predicted shape matches a target drawn from the same targets (sum over shapes of p_pred * p_true)."""
    n = len(rows)
    mean = lambda key: sum(r[key] for r in rows) / n
    predicted = [s for r in rows for s in r["predicted_shapes"]]
    targets = [shapes.split_class(r["class_index"])[0] for r in rows for _ in range(r["images"])]
    chance = sum(predicted.count(s) / len(predicted) * targets.count(s) / len(targets) for s in shapes.SHAPES)
    return {"runs": n, "shape_top1": mean("shape_top1"), "colour_top1": mean("colour_top1"),
            "both_top1": mean("both_top1"), "shape_shuffled_baseline": chance,
            "vlm_p_shape": mean("vlm_p_shape"), "vlm_p_colour": mean("vlm_p_colour")}


def evaluate(paths: list[Path]) -> tuple[list[dict], dict]:
    """Each run scored by the verifier and by the toy that inverted it."""
    folders = run_folders(paths)
    models = {folder: run_model(folder) for folder in folders}  # every run checked before loading
    adapters = {model: load_model(model, device="cpu") for model in sorted(set(models.values()))}
    classifier = verifier.load_verifier()
    rows = [evaluate_run(folder, adapters[models[folder]], classifier) for folder in folders]
    return rows, summarise(rows)
