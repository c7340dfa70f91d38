"""`mimic ask`: a model's answers to one question about images, with how sure it is: the greedy
answer and the k most probable answers with their probabilities, batched."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .engine import format_prompt
from .errors import UserError
from .features import find_images, open_rgb
from .lm_capture import until_end


def image_files(paths: list[str | os.PathLike]) -> list[Path]:
    """Each path a picture or a folder of them (searched recursively), in the order given."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += find_images(path)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"image '{path}' does not exist")
    if not files:
        raise UserError("give at least one image or folder of images (--images)")
    return files


@torch.no_grad()
def ask(adapter, files: list[Path], question: str, *, top: int = 3, max_new_tokens: int = 16,
        batch_size: int = 8) -> list[dict]:
    """One row per image: the greedy answer, and the `top` most probable answers with P."""
    if not question.strip():
        raise UserError("--question must not be empty")
    prompt = format_prompt(adapter, [(question, "")], target=False)
    decode = lambda ids: adapter.tokenizer.decode(until_end(adapter, ids), skip_special_tokens=True).strip()
    rows = []
    for start in range(0, len(files), batch_size):
        batch = files[start:start + batch_size]
        pixels = adapter.preprocess([open_rgb(path) for path in batch])
        greedy = adapter.generate(pixels, prompt, max_new_tokens).tolist()
        ids, probability = adapter.top_answers(pixels, prompt, top, max_new_tokens)
        for path, answer, answers, p in zip(batch, greedy, ids.tolist(), probability.tolist()):
            rows.append({"image": str(path), "question": question, "answer": decode(answer),
                         "top": [{"answer": decode(a), "p": round(q, 6)} for a, q in zip(answers, p)]})
    return rows

