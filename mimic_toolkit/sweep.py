"""Many concepts, one folder: `mimic sweep` inverts its shard's classes of a prompt file into
`<sweep>/c<class_index>/`, loading the model once. Rerunning the same command skips finished
classes and resumes an interrupted one, so shards can be restarted (or pre-empted) at will."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from .atomic import PARTIAL, partial_path, write_file
from .config import InversionConfig, read_config_file
from .errors import UserError
from .htmlkit import heading, image, link, page, table
from .prompts import IMAGENET_PROMPTS, load_prompts
from .registry import Registry
from .runfolder import RunBusy, RunFolder
from .session import Processes, build_config, check_same_settings, load_configured, run_inversion


def parse_shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not sep or not 0 <= i < n:
        raise UserError(f"--shard takes i/n with 0 <= i < n (e.g. 0/4), not '{text}'")
    return i, n


def shard_classes(all_classes: list[int], wanted: list[int] | None, shard: tuple[int, int]) -> list[int]:
    """This shard's classes: every n-th of the (sorted) selection, starting at i."""
    if wanted:
        missing = sorted(set(wanted) - set(all_classes))
        if missing:
            raise UserError(f"class index {missing[0]} is not in the prompt file")
    chosen = sorted(set(wanted or all_classes))
    i, n = shard
    return chosen[i::n]


def run_sweep(registry: Registry, config: InversionConfig, folder: Path, classes: list[int] | None,
              shard: tuple[int, int], *, progress=None, stop_requested=lambda: False, say=print) -> list[Path]:
    spec = registry.adapter_spec(config.model)
    prompts = config.prompts or spec.prompts or str(IMAGENET_PROMPTS)
    mine = shard_classes([c.class_index for c in load_prompts(prompts)], classes, shard)
    folder.mkdir(parents=True, exist_ok=True)
    adapter, done = None, []
    for class_index in mine:
        final = folder / f"c{class_index}"
        partial = partial_path(final)
        settings = replace(config, class_index=class_index, prompts=prompts, outputs=str(final), scales=dict(config.scales))
        if final.is_dir():  # kept only if it is what this command would make now
            check_same_settings(read_config_file(final / "config.yaml"), settings.to_dict(),
                                f"class {class_index} of sweep '{folder}' (a finished run)")
            say(f"class {class_index}: finished earlier, skipped")
            done.append(final)
            continue
        adapter = adapter or load_configured(registry, config, Processes(config.device).device)
        resume = str(partial) if RunFolder(final).checkpoint_path.is_file() else None
        try:
            _check_free(final)  # before "starting": a class another process runs is one line
            if final.is_dir():  # finished by another process while this one loaded the model
                say(f"class {class_index}: finished by another process, skipped")
                done.append(final)
                continue
            if resume:  # the interrupted run must have been made with these same settings
                settings = build_config(registry, settings.to_dict(), resume=resume)
            say(f"class {class_index}: {'resuming' if resume else 'starting'}")
            done.append(run_inversion(registry, settings, resume=resume, progress=progress,
                                      stop_requested=stop_requested, adapter=adapter))
        except RunBusy as exc:  # the same shard started twice: the other process finishes this class
            say(f"class {class_index}: {exc}; skipped")
            continue
        write_index(folder)
    write_index(folder)
    return done


def _check_free(final: Path) -> None:
    """Raises RunBusy when another process holds the run's lock (`run_inversion` takes it for good)."""
    probe = RunFolder(final)
    probe.lock()
    probe.unlock()


def write_index(folder: Path) -> Path:
    """index.html linking every class's report; rebuilt from the folder, so any shard may write it."""
    rows = []
    for class_index, run in sorted(_class_folders(folder)):
        name = run.name
        concept = _concept_name(run)
        if name.endswith(PARTIAL):
            rows.append([class_index, concept, "in progress", ""])
            continue
        thumb = next(iter(sorted((run / "images").glob("*.png"))), None)
        # linked, not embedded: the index is rewritten after every class of a sweep of hundreds
        picture = image(f"{name}/images/{thumb.name}", width=96, alt=name) if thumb else ""
        rows.append([link(f"{name}/report.html", str(class_index)), concept, "done", picture])
    index = page("mimic sweep", heading("Sweep"), table(["class", "concept", "status", "image"], rows))
    return write_file(folder / "index.html", index)


def _class_folders(folder: Path) -> list[tuple[int, Path]]:
    """(class index, run folder) of every `c<index>` folder, finished or not."""
    found = []
    for run in folder.glob("c*"):
        digits = run.name[1:].removesuffix(PARTIAL)
        if run.is_dir() and digits.isdigit():
            found.append((int(digits), run))
    return found


def _concept_name(run: Path) -> str:
    """The class name a run's manifest records ("" before it has one)."""
    try:
        return json.loads((run / "manifest.json").read_text())["concept"]["class_name"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
