"""Hidden-state capture: run the model on images (generating the answer when the token selector
needs it), keep the selected positions of one LM site, and store them as a features folder.

A features folder (written as `<name>.partial`, renamed when complete):
    meta.json             model, checkpoint, revision, site, selector, widths, counts, shards
    index.jsonl           one line per sample: id, image, question, generated answer (and ids), positions,
                          its rows in the shards (and for `word:` selectors the word and alignment)
    shard-00000.safetensors   `hidden`: [rows, D] fp32, the rows of consecutive samples
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .adapter import VLMAdapter
from .atomic import PartialFolder, refuse_existing
from .engine import format_prompt
from .errors import UserError
from .jsonfile import read_json_lines
from .features import adapter_revision, find_images, open_rgb
from .lm import LMRecorder
from .tensorfile import read_safetensors

FORMAT = "mimic-features/1"
DEFAULT_QUESTION = "Describe the image."


# -- inputs ------------------------------------------------------------------------------------
@dataclass
class Sample:
    id: str
    image: Path
    question: str
    labels: dict = field(default_factory=dict)  # whatever the dataset says about the image
    answer: str | None = None  # the dataset's answer to the question, if it gives one (mimic icl)


def load_samples(images: str | os.PathLike | None = None, dataset: str | os.PathLike | None = None,
                 question: str | None = None, allow_outside: bool = False) -> list[Sample]:
    """Samples from a folder of images (one question for all) or a dataset file: JSON lines (or a
    JSON list) of {"image": path relative to the file, "question"?, "id"?, "labels"?: {...}}. An image
    outside the dataset file's folder is refused unless `allow_outside` (a shared dataset file must
    not make the toolkit read arbitrary files)."""
    if (images is None) == (dataset is None):
        raise UserError("give either --images DIR or --dataset FILE")
    if images is not None:
        root = Path(images)
        return [Sample(str(p.relative_to(root).with_suffix("")), p.resolve(), question or DEFAULT_QUESTION)
                for p in find_images(root)]
    path = Path(dataset)
    if not path.is_file():
        raise UserError(f"dataset file '{dataset}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read dataset file '{dataset}': {exc}") from exc
    try:
        entries = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise UserError(f"dataset file '{dataset}' is not JSON lines or a JSON list: {exc}") from exc
    samples, seen = [], set()
    for n, entry in enumerate(entries):
        where = f"dataset file '{dataset}', entry {n}"
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise UserError(f"{where}: needs an \"image\" path")
        image = (path.parent / entry["image"]).resolve()
        if not allow_outside and not image.is_relative_to(path.parent.resolve()):
            raise UserError(f"{where}: image '{entry['image']}' is outside the dataset's folder "
                            f"(--allow-outside reads it)")
        if not image.is_file():
            raise UserError(f"{where}: image '{entry['image']}' does not exist")
        sample = Sample(str(entry.get("id", n)), image, entry.get("question") or question or DEFAULT_QUESTION,
                        entry.get("labels") or {}, entry.get("answer"))
        if not isinstance(sample.question, str) or not isinstance(sample.labels, dict):
            raise UserError(f"{where}: \"question\" must be a string and \"labels\" an object")
        if sample.answer is not None and not isinstance(sample.answer, str):
            raise UserError(f"{where}: \"answer\" must be a string")
        if sample.id in seen:
            raise UserError(f"{where}: id '{sample.id}' appears twice")
        seen.add(sample.id)
        samples.append(sample)
    if not samples:
        raise UserError(f"dataset file '{dataset}' has no entries")
    return samples


# -- token selection -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Selector:
    """Which positions of a sample become rows: every position (`all`), the `image` tokens, the
    `prompt` text tokens, the `last-prompt` token (one row each), the mean over the `generated`
    answer tokens up to the end token, or a `word:W[,W2...]` of the answer (one row each)."""

    kind: str
    words: tuple[str, ...] = ()

    KINDS = ("all", "image", "prompt", "last-prompt", "generated", "word:WORD[,WORD...]")

    @classmethod
    def parse(cls, text: str) -> "Selector":
        if text.startswith("word:"):
            words = tuple(w.strip().lower() for w in text[5:].split(",") if w.strip())
            if not words or not all(re.fullmatch(r"\w+", w) for w in words):
                raise UserError(f"word selector '{text}' needs whole words, e.g. word:red or word:red,blue")
            return cls("word", words)
        if text not in cls.KINDS[:-1]:
            raise UserError(f"--tokens must be one of {', '.join(cls.KINDS)}; got '{text}'")
        return cls(text)

    @property
    def needs_answer(self) -> bool:
        return self.kind in ("generated", "word")

    def __str__(self) -> str:
        return f"word:{','.join(self.words)}" if self.kind == "word" else self.kind


def token_spans(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of `ids` and each token's character span in it, from the tokenizer's
    offsets. Should the text re-tokenise differently (a model may generate a non-canonical
    split), the spans come from decoding growing prefixes instead, so they always describe `ids`."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if encoded.input_ids == list(ids):
        return text, [tuple(span) for span in encoded.offset_mapping]
    spans, start = [], 0
    for k in range(len(ids)):
        end = len(tokenizer.decode(ids[:k + 1], skip_special_tokens=True))
        spans.append((min(start, end), end))
        start = end
    return text, spans


def find_word(text: str, spans: list[tuple[int, int]], words: tuple[str, ...]):
    """The first whole-word occurrence of any of `words` in `text` (case-insensitive): (word,
    indices of the tokens that cover it), or None. "red" never matches inside "redder"."""
    pattern = r"(?<!\w)(" + "|".join(re.escape(w) for w in words) + r")(?!\w)"
    match = re.search(pattern, text, flags=re.IGNORECASE)
    if not match:
        return None
    start, end = match.span()
    covering = [k for k, (a, b) in enumerate(spans) if a < end and b > start and b > a]
    return match.group(1).lower(), covering


# -- capture -------------------------------------------------------------------------------------
def capture(adapter: VLMAdapter, model_id: str, samples: list[Sample], site: str, selector: Selector,
            out: str | os.PathLike, *, checkpoint: str = "", batch_size: int = 8, max_new_tokens: int = 16,
            word_position: str = "predict", generate: bool = False, shard_size: int = 4096) -> Path:
    """Capture `site` for every sample into the features folder `out`; returns its path.
    Samples whose selection is empty (no such word in the answer, an empty answer) are skipped
    and listed with the reason in meta.json; if every sample is, nothing is written."""
    adapter.lm_site(site)  # an unknown site fails before any work
    if word_position not in ("predict", "own"):
        raise UserError(f"--word-position must be predict or own, not '{word_position}'")
    if batch_size < 1 or max_new_tokens < 1 or shard_size < 1:
        raise UserError("batch size, max new tokens and shard size must be at least 1")
    writer = FeatureWriter(out, shard_size)
    skipped = []
    try:
        for question, group in by_question(samples):
            prompt = format_prompt(adapter, [(question, "")], target=False)
            for start in range(0, len(group), batch_size):
                batch = group[start:start + batch_size]
                for sample, entry, rows in _capture_batch(adapter, prompt, batch, site, selector, max_new_tokens,
                                                          word_position, generate or selector.needs_answer):
                    if rows is None:
                        skipped.append({"id": sample.id, "reason": entry})
                    else:
                        writer.add(entry, rows)
        if not writer.count:
            raise UserError(f"empty selection: no sample has positions for --tokens {selector} "
                            f"({skipped[0]['reason'] if skipped else 'no samples'})")
        meta = {"model": model_id, "checkpoint": checkpoint, "revision": adapter_revision(adapter), "site": site,
                "selector": str(selector), "hidden_size": adapter.hidden_size,
                "max_new_tokens": max_new_tokens if generate or selector.needs_answer else None,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "skipped": skipped}
        if selector.kind == "word":
            meta["word_position"] = word_position
        return writer.finish(meta)
    except BaseException:
        writer.abort()
        raise


def by_question(samples: list[Sample]):
    """Samples grouped by question (one prompt, no padding inside a batch), in first-seen order."""
    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.question, []).append(sample)
    return groups.items()


def until_end(adapter: VLMAdapter, ids: list[int]) -> list[int]:
    """Generated ids up to (not including) the first end token."""
    ends = set(adapter.end_token_ids())
    return ids[:next((k for k, t in enumerate(ids) if t in ends), len(ids))]


def open_images(batch: list[Sample]) -> list[Image.Image]:
    return [open_rgb(sample.image) for sample in batch]


@torch.no_grad()
def _capture_batch(adapter, prompt, batch, site, selector, max_new_tokens, word_position, generate):
    """Yields (sample, index entry, rows [n, D]) per sample, or (sample, reason, None) if skipped."""
    pixels = adapter.preprocess(open_images(batch))
    with LMRecorder(adapter, [site]) as recorder:
        if generate:
            new = adapter.generate(pixels, prompt, max_new_tokens).tolist()
        else:
            adapter.model(**adapter.pixel_inputs(pixels), **adapter.text_inputs(prompt, len(batch)),
                          use_cache=False, logits_to_keep=1)
            new = [[] for _ in batch]
    hidden = recorder.hidden[site].float().cpu()
    length = len(prompt.input_ids)
    for b, sample in enumerate(batch):
        answer = until_end(adapter, new[b])
        available = hidden.shape[1]  # the last generated token is never fed back
        answer_positions = [p for p in range(length, length + len(answer)) if p < available]
        entry = {"id": sample.id, "image": str(sample.image), "question": sample.question,
                 "prompt_length": length, "image_positions": prompt.image_positions.tolist(), "labels": sample.labels}
        if generate:
            entry.update(generated=adapter.tokenizer.decode(answer, skip_special_tokens=True), generated_ids=answer)
        kind = selector.kind
        if kind == "all":
            positions = list(range(length)) + answer_positions
        elif kind == "image":
            positions = prompt.image_positions.tolist()
        elif kind == "prompt":
            image = set(prompt.image_positions.tolist())
            positions = [p for p in range(length) if p not in image]
        elif kind == "last-prompt":
            positions = [length - 1]
        elif kind == "generated":
            positions = answer_positions
        else:
            positions, reason = _word_position(adapter.tokenizer, answer, selector.words, length, word_position,
                                               available, entry)
            if reason:
                yield sample, reason, None
                continue
        if not positions:
            yield sample, "the answer is empty", None
            continue
        entry["positions"] = positions
        rows = hidden[b, positions]
        yield sample, entry, rows.mean(0, keepdim=True) if kind == "generated" else rows


def _word_position(tokenizer, answer, words, length, word_position, available, entry):
    """The row position of the word of interest: the position that predicts its first token
    (`predict`) or the word's own last token, which has read all of it (`own`)."""
    text, spans = token_spans(tokenizer, answer)
    found = find_word(text, spans, words)
    if found is None:
        return [], f"the answer {text!r} has no word {' or '.join(words)}"
    word, tokens = found
    position = length + (tokens[0] - 1 if word_position == "predict" else tokens[-1])
    if position >= available:
        return [], f"the answer was cut off before the state of '{word}'"
    entry.update(word=word, alignment=word_position, word_tokens=[length + k for k in tokens])
    return [position], None


class FeatureWriter:
    """Writes a features folder: index entries and their rows, a shard every `shard_size` rows,
    all under `<out>.partial` until `finish` renames it. An entry's `rows` are [start, end) in its shard."""

    def __init__(self, out: str | os.PathLike, shard_size: int = 4096):
        refuse_existing(Path(out), "--out")
        self.output = PartialFolder(out)
        self.folder = self.output.start()
        self.shard_size = shard_size
        self.pending: list[torch.Tensor] = []
        self.pending_rows = self.rows = self.count = 0
        self.shards: list[str] = []
        self.index = (self.folder / "index.jsonl").open("w", encoding="utf-8")

    def add(self, entry: dict, rows: torch.Tensor) -> None:
        entry.update(shard=len(self.shards), rows=[self.pending_rows, self.pending_rows + len(rows)])
        self.index.write(json.dumps(entry) + "\n")
        self.pending.append(rows.float())
        self.pending_rows += len(rows)
        self.rows += len(rows)
        self.count += 1
        if self.pending_rows >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file({"hidden": torch.cat(self.pending).contiguous()}, str(self.folder / name), metadata={"format": FORMAT})
        self.shards.append(name)
        self.pending, self.pending_rows = [], 0

    def finish(self, meta: dict) -> Path:
        """`meta` needs model, checkpoint, revision, site, selector, hidden_size; counts are added."""
        self._flush()
        self.index.close()
        meta = {"format": FORMAT, **meta, "samples": self.count, "rows": self.rows, "shards": self.shards}
        (self.folder / "meta.json").write_text(json.dumps(meta, indent=2))
        return self.output.finish()

    def abort(self) -> None:
        self.index.close()
        self.output.discard()


# -- reading -------------------------------------------------------------------------------------
META_FIELDS = {"model": str, "checkpoint": str, "revision": str, "site": str, "selector": str, "hidden_size": int,
               "samples": int, "rows": int, "shards": list}  # what the commands read


def _is_span(rows) -> bool:
    return (isinstance(rows, list) and len(rows) == 2 and all(isinstance(r, int) for r in rows)
            and 0 <= rows[0] <= rows[1])


class Features:
    """A features folder: `meta`, `index` (one dict per sample), and the rows on demand."""

    def __init__(self, folder: Path, meta: dict, index: list[dict]):
        self.folder, self.meta, self.index = folder, meta, index

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Features":
        """Checks every field the commands read, so a damaged folder is one UserError naming the file
        and the field rather than a KeyError later."""
        folder = Path(folder)
        if not (folder / "meta.json").is_file():
            raise UserError(f"'{folder}' is not a features folder (no meta.json; make one with `mimic capture`)")
        (meta,) = read_json_lines(folder / "meta.json", whole=True)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError(f"'{folder}' is not a features folder (format {meta.get('format') if isinstance(meta, dict) else None!r})")
        for name, kind in META_FIELDS.items():
            if not isinstance(meta.get(name), kind) or kind is int and meta[name] < 0:
                raise UserError(f"features folder '{folder}' is damaged: meta.json needs {name!r} "
                                f"({kind.__name__}), has {meta.get(name)!r}")
        index = read_json_lines(folder / "index.jsonl")
        for n, entry in enumerate(index, 1):
            if not (isinstance(entry, dict) and isinstance(entry.get("id"), str) and isinstance(entry.get("image"), str)
                    and _is_span(entry.get("rows"))):
                raise UserError(f"features folder '{folder}' is damaged: index.jsonl line {n} needs an \"id\", "
                                f"an \"image\" and \"rows\" [start, end]")
        if len(index) != meta["samples"]:
            raise UserError(f"features folder '{folder}' is damaged: index.jsonl has {len(index)} samples, "
                            f"meta.json says {meta['samples']}")
        return cls(folder, meta, index)

    @property
    def model(self) -> str:
        return self.meta["model"]

    @property
    def site(self) -> str:
        return self.meta["site"]

    @property
    def ids(self) -> list[str]:
        return [entry["id"] for entry in self.index]

    def matrix(self) -> torch.Tensor:
        """All rows, [rows, D] fp32."""
        shards = []
        for name in self.meta["shards"]:
            tensors, _ = read_safetensors(self.folder / str(name), "features shard", format=FORMAT)
            if "hidden" not in tensors:
                raise UserError(f"features shard '{self.folder / name}' misses the tensor 'hidden'")
            shards.append(tensors["hidden"])
        rows = torch.cat(shards).float()
        if rows.shape != (self.meta["rows"], self.meta["hidden_size"]):
            raise UserError(f"features folder '{self.folder}' is damaged: rows {tuple(rows.shape)}, meta.json "
                            f"says ({self.meta['rows']}, {self.meta['hidden_size']})")
        return rows

    def row_samples(self) -> torch.Tensor:
        """The sample (index position) each row belongs to, [rows]."""
        owners = []
        for n, entry in enumerate(self.index):
            start, end = entry["rows"]
            owners += [n] * (end - start)
        return torch.tensor(owners)

    def per_sample(self) -> torch.Tensor:
        """One row per sample (the mean of its rows), [samples, D]."""
        rows, owners = self.matrix(), self.row_samples()
        sums = torch.zeros(len(self.index), rows.shape[1]).index_add_(0, owners, rows)
        return sums / torch.bincount(owners, minlength=len(self.index)).clamp_min(1)[:, None]

    def check_compatible(self, other: "Features", what: str, same_model: bool = True) -> None:
        """Refuse features that do not belong together, naming the field that differs."""
        fields = ("model", "site", "hidden_size") if same_model else ("site", "hidden_size")
        for name in fields:
            if self.meta[name] != other.meta[name]:
                raise UserError(f"{what}: '{self.folder}' has {name} {self.meta[name]!r}, "
                                f"'{other.folder}' has {other.meta[name]!r}")
