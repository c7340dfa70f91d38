"""Choosing vision-tower sites by canonical name (`--feature-sites`).

Every adapter names its vision sites the same way: `vision.patch_embedding`, and per encoder layer
i `vision.layers.{i}` (the layer's output), `vision.layers.{i}.attn` and `vision.layers.{i}.mlp`
(the branch outputs, before the residual add). So one selection means the same on every model.
"""
from __future__ import annotations

import fnmatch
import re

from .errors import UserError

# What the feature statistics use unless told otherwise: the paper's sites.
DEFAULT_FEATURE_SITES = "vision.patch_embedding,vision.layers.*.mlp"
SELECTION_HELP = ("comma list of glob patterns or index ranges over canonical site names, or last:N "
                  "(the MLPs of the last N layers), e.g. 'vision.layers.1[2-9].mlp,vision.patch_embedding', "
                  "'vision.layers.4-7.mlp' or 'last:8'")
_LAYER = re.compile(r"vision\.layers\.(\d+)\.mlp")


def select_sites(sites: dict, selection: str | None) -> dict:
    """The sites a selection names, in the adapter's order (embedding first, then by layer).
    An item that names no site is an error: a typo must not silently drop a term's sites."""
    names = list(sites)
    chosen: set[str] = set()
    for item in (selection or DEFAULT_FEATURE_SITES).split(","):
        item = item.strip()
        if not item:
            continue
        matched = _matches(item, names)
        if not matched:
            raise UserError(f"feature site '{item}' names no site of this model (its sites: {_summary(names)}; "
                            "`mimic models --sites MODEL` lists them)")
        chosen.update(matched)
    if not chosen:
        raise UserError(f"--feature-sites '{selection}' selects no site ({SELECTION_HELP})")
    return {name: sites[name] for name in names if name in chosen}


def _matches(item: str, names: list[str]) -> list[str]:
    if item.startswith("last:"):
        layers = sorted({int(m.group(1)) for m in map(_LAYER.fullmatch, names) if m})
        try:
            count = int(item[len("last:"):])
        except ValueError:
            count = 0
        if not 1 <= count <= len(layers):
            raise UserError(f"'{item}': N must be a whole number from 1 to {len(layers)} (this model's layers)")
        return [f"vision.layers.{i}.mlp" for i in layers[-count:]]
    return [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in _expand_ranges(item))]


def _expand_ranges(pattern: str) -> list[str]:
    """'vision.layers.4-7.mlp' -> the glob patterns of layers 4, 5, 6 and 7."""
    patterns = [""]
    for k, part in enumerate(pattern.split(".")):
        span = re.fullmatch(r"(\d+)-(\d+)", part)
        choices = [str(i) for i in range(int(span[1]), int(span[2]) + 1)] if span else [part]
        patterns = [p + ("." if k else "") + c for p in patterns for c in choices]
    return patterns


def _summary(names: list[str]) -> str:
    """Site names with their layer index folded: 'vision.patch_embedding, vision.layers.{0..23}.mlp, ...'."""
    folded: dict[str, list[int]] = {}
    for name in names:
        key = re.sub(r"\.(\d+)(\.|$)", r".{i}\2", name, count=1)
        index = re.search(r"\.(\d+)(\.|$)", name)
        folded.setdefault(key, []).append(int(index[1]) if index else -1)
    parts = []
    for key, indices in folded.items():
        parts.append(key.replace("{i}", f"{{{min(indices)}..{max(indices)}}}") if "{i}" in key else key)
    return ", ".join(parts)
