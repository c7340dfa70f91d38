"""Fine-tuning shift (XL-VLMs' method): how the concepts of an original
model move in its fine-tuned version, measured on the same inputs.

Concepts are points here: the mean of the samples a concept claims (for k-means, its centroid).
1. Fit K concepts on the original features; each sample goes to its strongest concept.
2. Shift of concept k = mean over its samples of (h_finetuned - h_original); the shifted concept
   is c_k + alpha * shift_k.
3. Fit K concepts on the fine-tuned features the same way and match shifted concepts to them one
   to one (Hungarian on cosine, all points centred on the fine-tuned mean).
4. Recovery, per matched pair and on average: cosine and distance of the original concept and of
   the shifted one to its fine-tuned match, the overlap of their top samples and (with a model to
   unembed) of their grounded words.
"""
from __future__ import annotations

import torch

from .lm_capture import Features
from .concepts import ground_words, whole_word_tokens
from .decompose import fit, hungarian
from .errors import UserError


def paired_rows(original: Features, finetuned: Features) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per sample from each, in the original's order, for the same sample ids."""
    original.check_compatible(finetuned, "shift", same_model=False)
    ids = original.ids
    where = {sample_id: n for n, sample_id in enumerate(finetuned.ids)}
    missing = [i for i in ids if i not in where]
    if missing or len(where) != len(ids):
        example = missing[0] if missing else next(i for i in where if i not in set(ids))
        raise UserError(f"shift needs paired samples: sample '{example}' is in only one of "
                        f"'{original.folder}' and '{finetuned.folder}'")
    order = torch.tensor([where[i] for i in ids])
    return original.per_sample(), finetuned.per_sample()[order]


def _concept_points(rows: torch.Tensor, method: str, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concept points [k, D] and each row's concept [N]; a concept that claims no row keeps its vector."""
    decomposition = fit(rows, method, k, seed=seed)
    assignment = decomposition.activations(rows).argmax(1)
    points = decomposition.vectors.clone()
    for c in range(k):
        members = rows[assignment == c]
        if len(members):
            points[c] = members.mean(0)
    return points, assignment


def _top_samples(rows: torch.Tensor, point: torch.Tensor, count: int) -> set[int]:
    return set((rows - point).norm(dim=1).argsort()[:count].tolist())


def shift_analysis(original: Features, finetuned: Features, *, method: str = "kmeans", k: int = 20,
                   alpha: float = 1.0, seed: int = 0, top: int = 10, adapter=None, words: int = 10) -> dict:
    """The shift of every original concept and how well the shifted concepts recover the
    fine-tuned model's own. `adapter` (the fine-tuned model) grounds concepts in words."""
    before, after = paired_rows(original, finetuned)
    concepts, assignment = _concept_points(before, method, k, seed)
    shifts = torch.zeros_like(concepts)
    for c in range(k):
        members = assignment == c
        if members.any():
            shifts[c] = (after[members] - before[members]).mean(0)
    shifted = concepts + alpha * shifts
    targets, _ = _concept_points(after, method, k, seed)

    centre = after.mean(0)
    unit = lambda x: (x - centre) / (x - centre).norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cosine = unit(shifted) @ unit(targets).T
    pairs = hungarian(-cosine)
    top = min(top, len(after))
    grounded = {}
    if adapter is not None:
        vocabulary = whole_word_tokens(adapter.tokenizer)
        for name, points in (("original", concepts), ("shifted", shifted), ("finetuned", targets)):
            grounded[name] = ground_words(adapter, points, count=words, vocabulary=vocabulary)
    rows = []
    for c, j in pairs:
        row = {"concept": c, "match": j, "samples": int((assignment == c).sum()),
               "shift_norm": float(shifts[c].norm()),
               "cosine_original": float(unit(concepts[c]) @ unit(targets[j])),
               "cosine_shifted": float(cosine[c, j]),
               "distance_original": float((concepts[c] - targets[j]).norm()),
               "distance_shifted": float((shifted[c] - targets[j]).norm()),
               "top_overlap_original": len(_top_samples(after, concepts[c], top) & _top_samples(after, targets[j], top)) / top,
               "top_overlap_shifted": len(_top_samples(after, shifted[c], top) & _top_samples(after, targets[j], top)) / top}
        if grounded:
            ft_words = set(grounded["finetuned"][j])
            for name in ("original", "shifted"):
                mine = set(grounded[name][c])
                row[f"word_overlap_{name}"] = len(mine & ft_words) / max(len(mine | ft_words), 1)
            row.update(words_original=grounded["original"][c], words_shifted=grounded["shifted"][c],
                       words_finetuned=grounded["finetuned"][j])
        rows.append(row)
    numeric = [key for key, value in rows[0].items() if isinstance(value, float)]
    summary = {key: sum(r[key] for r in rows) / len(rows) for key in numeric}
    summary["distance_improvement"] = summary["distance_original"] - summary["distance_shifted"]
    return {"original": str(original.folder), "finetuned": str(finetuned.folder), "method": method, "k": k,
            "alpha": alpha, "samples": len(before), "site": original.site, "summary": summary, "concepts": rows}
