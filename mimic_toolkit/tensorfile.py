"""Reading the safetensors files this toolkit writes (feature statistics, run checkpoints). The format
holds tensors and string metadata only, so a file can never carry code; a file that is missing,
truncated, damaged or of another format is one UserError naming it."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import UserError


def read_safetensors(path: str | os.PathLike, what: str, *, format: str | None = None,
                     tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the file at `path`, a `what` ("feature-statistics file"); `format`
    must then be its metadata's "format"; `tensors=False` reads only the header."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} '{path}' does not exist")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            data = {key: f.get_tensor(key) for key in f.keys()} if tensors else {}
    except (SafetensorError, OSError) as exc:
        raise UserError(f"'{path}' is not a {what}: truncated or damaged ({exc})") from exc
    if format is not None and meta.get("format") != format:
        raise UserError(f"'{path}' is not a {what} (format is {meta.get('format')!r}, not {format!r})")
    refuse_nonfinite(data, path)
    return data, meta


def refuse_nonfinite(tensors: dict[str, torch.Tensor], path) -> None:
    """A loaded tensor with NaN or inf would run on silently into garbage: one line naming it."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"'{path}': its tensor '{key}' holds NaN or infinite values")
