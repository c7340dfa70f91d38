"""Reading the JSON and JSON-lines files this toolkit writes (features folders, run folders): a file
that is unreadable, not UTF-8 or not valid JSON is one UserError naming it and the line."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError, shown


def read_json_lines(path: Path, whole: bool = False) -> list:
    """The JSON values of a file's non-empty lines (or, `whole`, the file's one value in a list)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read '{shown(path)}': {exc}") from exc
    values = []
    for n, line in enumerate([text] if whole else text.splitlines(), 1):
        if line.strip() or whole:
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"'{shown(path)}'{'' if whole else f' line {n}'} is not valid JSON: {exc}") from exc
    return values
