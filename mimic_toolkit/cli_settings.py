"""The inversion settings as command-line options, derived from InversionConfig's fields (see
`config.setting`), so that a new setting is written once and `mimic invert`, `sweep` and `compare`
spell and explain it alike."""
from __future__ import annotations

import functools
import inspect
from dataclasses import MISSING, fields
from pathlib import Path
from typing import List, Optional

import typer

from .config import OBJECTIVE, PANELS, RUN, InversionConfig, field_type
from .errors import UserError

# the built-in terms with a flag of their own (--main-loss-scale, ...); any term: --scale NAME=VALUE
TERM_FLAGS = {"main": "Scale of the answer cross-entropy.", "feature": "Scale of the feature statistics (0 = off).",
              "patch": "Scale of the patch-seam prior.", "tv_l1": "Scale of TV-L1.", "tv_l2": "Scale of TV-L2.",
              "l2": "Scale of the image L2 norm."}


def with_settings(*names: str, term_flags: bool = False):
    """Give a command the options of the InversionConfig fields `names` (every flag field when none
    are named), `--scale NAME=VALUE` and, with `term_flags`, the `--TERM-loss-scale` flags. The
    command receives what was given as one keyword, `flags`: {field: value}, scales merged into
    `scales`, ready for `build_config`."""
    by_name = {f.name: f for f in fields(InversionConfig)}
    chosen = [by_name[n] for n in names] if names else [f for f in by_name.values() if f.metadata.get("flag", True)]
    terms = list(TERM_FLAGS) if term_flags else []
    # flags left out stay None, so that the lower layers (the model's defaults, --config) show through
    options = [_option(f.name, Optional[Path if f.metadata.get("path") else field_type(f)], f.metadata, f.default)
               for f in chosen]
    options += [_option(f"{term}_loss_scale", Optional[float], {"help": TERM_FLAGS[term], "panel": OBJECTIVE})
                for term in terms]
    options.append(inspect.Parameter("scale", inspect.Parameter.KEYWORD_ONLY, annotation=List[str],
                                     default=typer.Option([], help="NAME=VALUE for any objective term, plugin "
                                                          "terms too.", rich_help_panel=OBJECTIVE)))
    options.sort(key=lambda p: PANELS.index(p.default.rich_help_panel))  # typer shows the panels as they come

    def decorate(command):
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "flags"]

        @functools.wraps(command)
        def run(**kwargs):
            flags = {}
            for f in chosen:
                value = kwargs.pop(f.name)
                if value is not None:
                    flags[f.name] = str(value) if f.metadata.get("path") else value  # the config keeps strings
            given = {term: kwargs.pop(f"{term}_loss_scale") for term in terms}
            scales = {**{t: v for t, v in given.items() if v is not None}, **_parse_scales(kwargs.pop("scale"))}
            if scales:
                flags["scales"] = scales
            return command(flags=flags, **kwargs)

        run.__signature__ = inspect.Signature(own + options)  # what typer reads the options from
        return run

    return decorate


def _option(name: str, annotation, meta, default=None) -> inspect.Parameter:
    """The option's own value is None (not given); `--help` shows the setting's default instead."""
    flag = "--" + name.replace("_", "-")
    decls = [f"{flag}/--no-{flag[2:]}" if annotation == Optional[bool] else flag]
    if meta.get("short"):
        decls.append(meta["short"])
    shown = "" if default in (None, MISSING) else (
        f" (default: {flag[2:] if default is True else 'no-' + flag[2:] if default is False else default})")
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=typer.Option(
        None, *decls, help=meta.get("help", "") + shown, rich_help_panel=meta.get("panel", RUN), show_default=False))


def _parse_scales(pairs: list[str]) -> dict[str, float]:
    scales = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            scales[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise UserError(f"--scale takes NAME=VALUE, got '{pair}'")
    return scales
