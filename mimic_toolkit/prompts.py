"""Prompt files: a JSON list of {class_index, class_name, chat_sequence}, where chat_sequence is a
list of [user, assistant] pairs and the last assistant message is the inversion target."""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import UserError

IMAGENET_PROMPTS = resources.files("mimic_toolkit") / "data" / "imagenet_prompts.json"


@dataclass(frozen=True)
class Concept:
    class_index: int
    class_name: str
    chat_sequence: tuple[tuple[str, str], ...]

    @property
    def target(self) -> str:
        return self.chat_sequence[-1][1]


def load_prompts(path) -> list[Concept]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file '{path}' does not exist")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"prompt file '{path}' is not valid JSON: {exc}") from exc
    if not isinstance(entries, list) or not entries:
        raise UserError(f"prompt file '{path}' must hold a non-empty JSON list of entries")
    concepts, seen = [], set()
    for n, entry in enumerate(entries):
        concept = _parse_entry(entry, f"prompt file '{path}', entry {n}")
        if concept.class_index in seen:
            raise UserError(f"prompt file '{path}', entry {n}: class_index {concept.class_index} appears twice")
        seen.add(concept.class_index)
        concepts.append(concept)
    return concepts


def _parse_entry(entry, where: str) -> Concept:
    if not isinstance(entry, dict):
        raise UserError(f"{where}: must be an object with class_index, class_name, chat_sequence")
    for field in ("class_index", "class_name", "chat_sequence"):
        if field not in entry:
            raise UserError(f"{where}: missing field '{field}'")
    index, name, chat = entry["class_index"], entry["class_name"], entry["chat_sequence"]
    if not isinstance(index, int) or isinstance(index, bool):
        raise UserError(f"{where}: 'class_index' must be an integer, got {index!r}")
    if not isinstance(name, str):
        raise UserError(f"{where}: 'class_name' must be a string")
    pairs_ok = isinstance(chat, list) and chat and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in chat)
    if not pairs_ok:
        raise UserError(f"{where} (class {index}): 'chat_sequence' must be a non-empty list of [user, assistant] string pairs")
    if not chat[-1][1].strip():
        raise UserError(f"{where} (class {index}): the last assistant message (the target) is empty")
    return Concept(index, name, tuple((u, a) for u, a in chat))


def select(concepts: list[Concept], class_index: int | None, source: str) -> Concept:
    if class_index is None:
        return concepts[0]
    for concept in concepts:
        if concept.class_index == class_index:
            return concept
    known = ", ".join(str(c.class_index) for c in concepts[:12])
    raise UserError(f"class index {class_index} is not in {source} (it has: {known}{', ...' if len(concepts) > 12 else ''})")


def direct(question: str, answer: str) -> Concept:
    if not question.strip() or not answer.strip():
        raise UserError("--question and --answer must both be non-empty")
    return Concept(-1, answer, ((question, answer),))
