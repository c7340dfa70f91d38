"""Steering vectors: the mean difference of two captured feature sets, added to an LM site while
the model answers, with the answers before and after side by side."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from .atomic import atomic_file
from .lm_capture import Features, Sample, by_question, open_images, until_end
from .engine import format_prompt
from .errors import UserError
from .tensorfile import refuse_nonfinite
from .lm import PositionPolicy, Steering

FORMAT = "mimic-steering/1"


def build_vector(base: Features, target: Features) -> tuple[torch.Tensor, dict]:
    """v = mean(target) - mean(base), each sample's rows averaged first so that long samples do
    not outweigh short ones."""
    base.check_compatible(target, "steer build")
    vector = target.per_sample().mean(0) - base.per_sample().mean(0)
    meta = {"format": FORMAT, "model": base.model, "site": base.site, "hidden_size": base.meta["hidden_size"],
            "selector": base.meta["selector"], "base": str(base.folder), "target": str(target.folder),
            "base_samples": len(base.index), "target_samples": len(target.index), "norm": round(float(vector.norm()), 6)}
    return vector, meta


def save_vector(vector: torch.Tensor, meta: dict, path: str | os.PathLike) -> Path:
    """Written under a temporary name and renamed, so a file at `path` is always complete."""
    from safetensors.torch import save_file

    with atomic_file(path, new="--out") as partial:
        save_file({"vector": vector.contiguous().float()}, str(partial), metadata={"meta": json.dumps(meta)})
    return Path(path)


def load_vector(path: str | os.PathLike) -> tuple[torch.Tensor, dict]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"vector file '{path}' does not exist (make one with `mimic steer build`)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            vector = f.get_tensor("vector").float()
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise UserError(f"'{path}' is not a steering vector file ({exc})") from exc
    refuse_nonfinite({"vector": vector}, path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or vector.dim() != 1:
        raise UserError(f"'{path}' is not a steering vector file (format "
                        f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    for name in ("model", "site"):  # what `steer apply` reads
        if not isinstance(meta.get(name), str):
            raise UserError(f"steering vector file '{path}' is damaged: its meta needs {name!r} (str), has {meta.get(name)!r}")
    return vector, meta


def steer_answers(adapter, samples: list[Sample], site: str, vector: torch.Tensor, alpha: float,
                  positions: PositionPolicy, *, max_new_tokens: int = 16, batch_size: int = 8) -> list[dict]:
    """Greedy answers without and with `alpha * vector` added at `site`, one row per sample."""
    adapter.lm_site(site)
    rows = []
    decode = lambda ids: adapter.tokenizer.decode(until_end(adapter, ids), skip_special_tokens=True).strip()
    for question, group in by_question(samples):
        prompt = format_prompt(adapter, [(question, "")], target=False)
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            pixels = adapter.preprocess(open_images(batch))
            before = adapter.generate(pixels, prompt, max_new_tokens).tolist()
            with Steering(adapter, site, vector.to(adapter.device), alpha, positions):
                after = adapter.generate(pixels, prompt, max_new_tokens).tolist()
            for sample, old, new in zip(batch, before, after):
                rows.append({"id": sample.id, "image": str(sample.image), "question": question,
                             "labels": sample.labels, "before": decode(old), "after": decode(new)})
    return rows
