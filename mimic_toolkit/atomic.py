"""Files and folders that are complete whenever they exist under their own name: each is written as
`<name>.partial` beside it and renamed when done (a rename within one folder is atomic), so a crash
leaves at most a `.partial`, never a half-written file under the real name."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError

PARTIAL = ".partial"


def partial_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + PARTIAL)


def refuse_existing(path: Path, option: str) -> None:
    """Stop before any work when `path` exists; `option` is the flag that picks another name."""
    if path.exists():
        raise UserError(f"'{path}' already exists; choose another {option}")


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """A write that fails in the file system (a full disk, a read-only one, a parent that is a
    file) is one line naming the path and what happened."""
    try:
        yield
    except OSError as exc:
        raise UserError(f"cannot write '{path}': {os.strerror(exc.errno) if exc.errno else exc}") from exc


@contextmanager
def atomic_file(path: str | os.PathLike, *, new: str | None = None) -> Iterator[Path]:
    """Yields the `.partial` path to write; it replaces `path` when the block succeeds and is removed
    when it fails. `new` (the flag that picks another name) refuses an existing `path`."""
    path = Path(path)
    if new:
        refuse_existing(path, new)
    partial = partial_path(path)
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield partial
            partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_file(path: str | os.PathLike, data: str | bytes, *, new: str | None = None) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically; `new` as in `atomic_file`."""
    with atomic_file(path, new=new) as partial:
        if isinstance(data, bytes):
            partial.write_bytes(data)
        else:
            partial.write_text(data, encoding="utf-8")
    return Path(path)


def check_replaceable(folder: str | os.PathLike, written_here: Callable[[Path], bool], option: str) -> None:
    """Before long work that will replace `folder` whole: refuse a folder that holds anything
    else than what this writer makes (`written_here(folder)`), so a mistyped path loses nothing."""
    folder = Path(folder)
    if folder.is_dir() and any(folder.iterdir()) and not written_here(folder):
        raise UserError(f"'{folder}' holds files this command did not write and would replace them; "
                        f"choose another {option}")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"'{folder}' is a file, not a folder; choose another {option}")


class PartialFolder:
    """A folder built at `<final>.partial` and renamed to `final` by `finish`, for writers whose work
    spans several calls (a run that can be resumed, a capture fed batch by batch)."""

    def __init__(self, final: str | os.PathLike):
        self.final = Path(final)
        self.path = partial_path(self.final)

    def start(self) -> Path:
        """An empty `.partial` folder; the debris of an interrupted attempt is removed first."""
        shutil.rmtree(self.path, ignore_errors=True)
        with writing(self.path):
            self.path.mkdir(parents=True)
        return self.path

    def finish(self, *, replace: bool = False) -> Path:
        """Rename to the final name; `replace` removes a previous folder of that name first."""
        if replace:
            shutil.rmtree(self.final, ignore_errors=True)
        self.path.rename(self.final)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@contextmanager
def atomic_folder(final: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yields an empty `<final>.partial` folder to fill; renamed to `final` when the block succeeds
    (`replace`: over a previous one) and removed when it fails."""
    folder = PartialFolder(final)
    path = folder.start()
    try:
        yield path
    except BaseException:
        folder.discard()
        raise
    folder.finish(replace=replace)
