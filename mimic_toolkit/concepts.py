"""Concept dictionaries fitted on captured hidden states, grounded in words (the unembedded concept
vector's top whole-word tokens) and in images (the samples that activate a concept most).

A concepts folder (written as `<name>.partial`, renamed when complete):
    concepts.safetensors   `vectors` [K, D], `mean` [D]; metadata: method, model, site, ...
    concepts.json          per concept: words, top samples; metrics (word overlap, label purity)
    report.html            a card per concept with its words and thumbnails, self-contained
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import torch
from PIL import Image

from .atomic import atomic_folder, refuse_existing
from .lm_capture import Features
from .decompose import Decomposition, fit, purity
from .errors import UserError
from .htmlkit import Html, block, facts, figure, heading, image, page, paragraph, span, text
from .tensorfile import refuse_nonfinite

FORMAT = "mimic-concepts/1"
# Function words that say nothing about a concept (English; lower case).
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself no nor not now of off on once only or other our ours ourselves out over own same she should
so some such than that the their theirs them themselves then there these they this those through to
too under until up very was we were what when where which while who whom why will with would you
your yours yourself yourselves also yes one two its
""".split())
MIN_WORD_LENGTH = 3  # shorter alphabetic tokens are mostly word pieces ("bl", "ue")


@dataclass
class ConceptSet:
    decomposition: Decomposition
    meta: dict  # model, checkpoint, revision, site, selector, hidden_size, features, method, k, ...

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        d = self.decomposition
        save_file({"vectors": d.vectors.contiguous(), "mean": d.mean.contiguous()}, str(path),
                  metadata={"format": FORMAT, "meta": json.dumps(self.meta)})

    @classmethod
    def load(cls, source: str | os.PathLike) -> "ConceptSet":
        """A concepts folder or its concepts.safetensors."""
        from safetensors import SafetensorError, safe_open

        path = Path(source)
        if path.is_dir():
            path = path / "concepts.safetensors"
        if not path.is_file():
            raise UserError(f"concepts file '{source}' does not exist (make one with `mimic concepts fit`)")
        try:
            with safe_open(str(path), "pt") as f:
                header = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            meta = json.loads(header.get("meta", "{}"))
        except (SafetensorError, OSError, json.JSONDecodeError) as exc:
            raise UserError(f"'{source}' is not a concepts file ({exc})") from exc
        refuse_nonfinite(tensors, path)
        if header.get("format") != FORMAT or "vectors" not in tensors:
            raise UserError(f"'{source}' is not a concepts file (format {header.get('format')!r})")
        d = Decomposition(meta["method"], tensors["vectors"].float(), tensors["mean"].float(), meta.get("sparsity", 0.0))
        return cls(d, meta)

    def check_features(self, features: Features) -> None:
        for name in ("model", "site", "hidden_size"):
            if self.meta[name] != features.meta[name]:
                raise UserError(f"the concepts were fitted on {name} {self.meta[name]!r}; features "
                                f"'{features.folder}' have {features.meta[name]!r}")


# -- grounding -----------------------------------------------------------------------------------------
def whole_word_tokens(tokenizer) -> dict[int, str]:
    """Vocabulary entries that are a whole word on their own: alphabetic, at least
    MIN_WORD_LENGTH letters, not a stop word, and the very token the tokenizer gives for that word
    written after a space (so word pieces such as "berry" of "blueberry" drop out)."""
    size = len(tokenizer)
    decoded = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=True)
    words = {i: s.strip() for i, s in enumerate(decoded)
             if s.strip().isalpha() and len(s.strip()) >= MIN_WORD_LENGTH and s.strip().lower() not in STOP_WORDS}
    prefix = "x "
    encoded = tokenizer([prefix + w for w in words.values()], add_special_tokens=False, return_offsets_mapping=True)
    kept = {}
    for (i, word), ids, offsets in zip(words.items(), encoded.input_ids, encoded.offset_mapping):
        covering = [t for t, (a, b) in zip(ids, offsets) if b > len(prefix) and b > a]
        if covering == [i]:
            kept[i] = word
    return kept


def ground_words(adapter, vectors: torch.Tensor, *, apply_final_norm: bool = True, count: int = 10,
                 vocabulary: dict[int, str] | None = None) -> list[list[str]]:
    """Each vector's top `count` whole words by its unembedding (case-folded, no repeats)."""
    vocabulary = vocabulary if vocabulary is not None else whole_word_tokens(adapter.tokenizer)
    if not vocabulary:
        return [[] for _ in vectors]
    ids = torch.tensor(list(vocabulary))
    with torch.no_grad():
        logits = adapter.unembed(vectors, apply_final_norm=apply_final_norm)[:, ids.to(vectors.device)].cpu()
    grounded = []
    for row in logits:
        words: list[str] = []
        for j in row.argsort(descending=True).tolist():
            word = vocabulary[int(ids[j])].lower()
            if word not in words:
                words.append(word)
            if len(words) == count:
                break
        grounded.append(words)
    return grounded


def word_overlap(words: list[list[str]]) -> float:
    """Mean Jaccard overlap of the grounded word sets over all pairs of concepts (lower = more
    disentangled)."""
    pairs = list(combinations([set(w) for w in words], 2))
    if not pairs:
        return 0.0
    return sum(len(a & b) / max(len(a | b), 1) for a, b in pairs) / len(pairs)


def sample_activations(decomposition: Decomposition, features: Features) -> torch.Tensor:
    """Per sample, each concept's strongest activation over the sample's rows, [samples, K]."""
    acts = decomposition.activations(features.matrix())
    owners = features.row_samples()
    best = torch.full((len(features.index), acts.shape[1]), -torch.inf)
    return best.scatter_reduce(0, owners[:, None].expand_as(acts), acts, reduce="amax")


def label_purity(assignment: list[int], index: list[dict]) -> dict[str, float]:
    """Purity of the concept assignment against every label the dataset gave all samples."""
    keys = set.intersection(*(set(entry.get("labels") or {}) for entry in index)) if index else set()
    return {key: round(purity(assignment, [str(e["labels"][key]) for e in index]), 4) for key in sorted(keys)}


# -- fitting -------------------------------------------------------------------------------------------
def fit_concepts(features: Features, method: str, k: int, out: str | os.PathLike, *, adapter=None,
                 seed: int = 0, sparsity: float = 0.1, words: int = 10, images: int = 6,
                 apply_final_norm: bool | None = None) -> Path:
    """Fit K concepts on a features folder, ground them and write the concepts folder `out`.
    Without an adapter the concepts are grounded in images only. `apply_final_norm` (default:
    unless the site is the final norm) says whether concept vectors pass the final norm first."""
    out = Path(out)
    refuse_existing(out, "--out")
    rows = features.matrix()
    decomposition = fit(rows, method, k, seed=seed, sparsity=sparsity)
    acts = sample_activations(decomposition, features)
    assignment = acts.argmax(1).tolist()
    if apply_final_norm is None:
        apply_final_norm = features.site != "lm.final_norm"
    grounded = ground_words(adapter, decomposition.vectors, apply_final_norm=apply_final_norm, count=words) \
        if adapter is not None else [[] for _ in range(k)]
    cards = []
    for c in range(k):
        top = acts[:, c].argsort(descending=True)[:images].tolist()
        cards.append({"concept": c, "words": grounded[c], "samples": int(sum(a == c for a in assignment)),
                      "top": [{"id": features.index[n]["id"], "image": features.index[n]["image"],
                               "activation": round(float(acts[n, c]), 4)} for n in top]})
    metrics = {"word_overlap": round(word_overlap(grounded), 4) if adapter is not None else None,
               "purity": label_purity(assignment, features.index)}
    meta = {**{key: features.meta[key] for key in ("model", "checkpoint", "revision", "site", "selector", "hidden_size")},
            "features": str(features.folder), "method": method, "k": k, "seed": seed,
            "sparsity": decomposition.sparsity, "final_norm": apply_final_norm, "rows": rows.shape[0],
            "words": grounded, "metrics": metrics}
    with atomic_folder(out) as folder:
        ConceptSet(decomposition, meta).save(folder / "concepts.safetensors")
        summary = {"meta": {k_: v for k_, v in meta.items() if k_ != "words"}, "concepts": cards}
        (folder / "concepts.json").write_text(json.dumps(summary, indent=2))
        (folder / "report.html").write_text(_report(meta, cards), encoding="utf-8")
    return out


def project(concepts: ConceptSet, features: Features, top: int = 3) -> list[dict]:
    """Each sample's concept activations and its `top` concepts (with their words)."""
    concepts.check_features(features)
    acts = sample_activations(concepts.decomposition, features)
    words = concepts.meta.get("words") or [[] for _ in range(concepts.decomposition.k)]
    rows = []
    for entry, values in zip(features.index, acts):
        best = values.argsort(descending=True)[:top].tolist()
        rows.append({"id": entry["id"], "image": entry["image"], "activations": [round(float(v), 4) for v in values],
                     "top": [{"concept": c, "activation": round(float(values[c]), 4), "words": words[c][:5]}
                             for c in best]})
    return rows


# -- report ----------------------------------------------------------------------------------------------
def _thumbnail(path: str, side: int = 96) -> Html:
    try:
        with Image.open(path) as picture:
            picture = picture.convert("RGB")
            picture.thumbnail((side, side))
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
    except OSError:
        return span(Path(path).name, "error")
    return image(buffer.getvalue(), width=side, alt=Path(path).name)


def _report(meta: dict, cards: list[dict]) -> str:
    metrics = meta["metrics"]
    summary = {"model": meta["model"], "site": meta["site"], "tokens": meta["selector"], "method": meta["method"],
               "concepts": meta["k"], "rows": meta["rows"], "features": meta["features"],
               "word overlap (mean pairwise Jaccard)": metrics["word_overlap"],
               **{f"purity vs {key}": value for key, value in metrics["purity"].items()}}
    sections = []
    for card in cards:
        thumbs = [figure(_thumbnail(t["image"]), Html(f"{text(t['id'])}<br>{t['activation']:.3g}")) for t in card["top"]]
        name = Html(f"concept {card['concept']} <small>({card['samples']} samples)</small>")
        words = ", ".join(card["words"]) or Html("<i>no words</i>")
        sections.append(block(heading(name, 3), paragraph(words, "words"), block(*thumbs, css_class="row"),
                              css_class="card"))
    title = f"Concepts: {meta['model']} {meta['site']} ({meta['method']}, K={meta['k']})"
    return page(title, heading(title), facts(summary), *sections)
