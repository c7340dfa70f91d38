"""The `mimic` command line. Every bad input ends in one `error:` line and exit code 2."""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from .cli_icl import add_commands as add_icl_commands
from .cli_lm import add_commands as add_lm_commands
from .cli_sae import add_commands as add_sae_commands
from .cli_settings import with_settings
from .config import InversionConfig
from .errors import UserError
from .registry import default_registry


class _Commands(TyperGroup):
    """Turns a UserError from any command (plugin commands included), and click's usage errors (a bad
    option value, a missing or unknown option) in place of its usage box, into one line + exit 2."""

    def parse_args(self, ctx, args):
        with _one_line():  # options of `mimic` itself
            return super().parse_args(ctx, args)

    def invoke(self, ctx):
        with _one_line():  # subcommands parse their options inside this
            return super().invoke(ctx)


# click's exceptions, from the module typer raises them from (newer typer vendors click as typer._click)
_CLICK_ERRORS = sys.modules[typer.BadParameter.__module__]


@contextmanager
def _one_line():
    try:
        yield
    except getattr(_CLICK_ERRORS, "NoArgsIsHelpError", ()):  # a bare `mimic concepts` shows its help
        raise
    except _CLICK_ERRORS.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "mimic"
        typer.echo(f"error: {exc.format_message()} ({where} --help)", err=True)
        raise typer.Exit(2)
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)


app = typer.Typer(cls=_Commands, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="See what vision-language models see: model inversion and more.")


def _show_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"mimic-toolkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                       help="Print the version and exit."),
          verbose: bool = typer.Option(False, "--verbose", "-v",
                                       help="Say more: what was loaded from where and how long it took, "
                                       "and transformers' own messages.")):
    """See what vision-language models see: model inversion and more."""
    from . import verbosity

    verbosity.configure(verbose)


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
           sites: Optional[str] = typer.Option(None, "--sites", metavar="MODEL",
                                               help="List MODEL's canonical vision-tower sites instead."),
           checkpoint: Optional[str] = typer.Option(None, help="With --sites: read the architecture from this folder.")):
    """List every model adapter: id, aliases, plugin, native resolution, default settings."""
    if sites:
        from .engine import describe_sites

        origin, listing = describe_sites(sites, checkpoint)
        if as_json:
            typer.echo(json.dumps({"from": origin, "sites": listing}, indent=2))
            return
        typer.echo(f"{len(listing)} vision sites ({origin}); * = used by default (--feature-sites selects others):")
        for site, default in listing.items():
            typer.echo(f"{'*' if default else ' '} {site}")
        return
    specs = default_registry().adapter_specs()
    rows = [{"id": s.id, "aliases": list(s.aliases), "plugin": s.plugin, "resolution": s.resolution,
             "defaults": s.defaults, "checkpoint": s.checkpoint, "tested_transformers": s.tested_transformers,
             "untuned": s.untuned, "description": s.description} for s in specs.values()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "aliases", "plugin", "px", "defaults", "transformers")
    for r in rows:
        defaults = ", ".join(f"{k}={v}" for k, v in r["defaults"].items() if k != "scales")
        defaults += " (untuned)" if r["untuned"] else ""
        table.add_row(r["id"], ", ".join(r["aliases"]), r["plugin"], str(r["resolution"]), defaults,
                      r["tested_transformers"])
    Console().print(table)


@app.command()
def plugins(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """List loaded plugins and the hooks each implements."""
    rows = [{"name": name, "hooks": hooks} for name, hooks in default_registry().plugins()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        typer.echo(f"{row['name']}: {', '.join(row['hooks'])}")


@app.command()
@with_settings(term_flags=True)
def invert(
    flags: dict,
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with any of these settings."),
    resume: Optional[Path] = typer.Option(None, help="Continue an interrupted run folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
    as_json: bool = typer.Option(False, "--json", help="End with a JSON summary on standard output."),
):
    """Synthesise images for which the model gives the target answer (MIMIC).

    The defaults shown are the core's; a model's own defaults (`mimic models`) come before them."""
    from .session import Interrupted, build_config, run_inversion, stop_on_ctrl_c

    registry = default_registry()
    settings = build_config(registry, flags, _str(config), _str(resume))
    from .live import progress_display

    panel = progress_display(quiet or os.environ.get("RANK", "0") != "0")
    try:
        with stop_on_ctrl_c() as stop_requested, panel or nullcontext():
            folder = run_inversion(registry, settings, resume=_str(resume), stop_requested=stop_requested,
                                   progress=panel.update if panel else None)
    except Interrupted as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(130)
    if os.environ.get("RANK", "0") != "0":  # one process of a multi-process run speaks
        return
    if as_json:
        from .runfolder import summary

        typer.echo(json.dumps(summary(folder), indent=2))
    else:
        typer.echo(f"run folder: {folder}\nreport:     {folder / 'report.html'}")


@app.command()
@with_settings("model", "checkpoint", "prompts", "stats", "iterations", "batch_size", "seed", "device")
def sweep(
    flags: dict,
    outputs: Path = typer.Option(..., help="The sweep folder: one run folder per class, plus index.html."),
    classes: Optional[str] = typer.Option(None, help="Comma-separated class indices (default: all in the file)."),
    shard: str = typer.Option("0/1", help="i/n: this process takes every n-th class starting at i."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with any `mimic invert` setting."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
    as_json: bool = typer.Option(False, "--json", help="End with a JSON summary of this shard's runs on standard output."),
):
    """Invert many classes into one sweep folder; restarted shards continue where they stopped."""
    from .live import progress_display
    from .session import Interrupted, build_config, stop_on_ctrl_c
    from .sweep import parse_shard, run_sweep

    try:
        wanted = [int(c) for c in classes.split(",")] if classes else None
    except ValueError:
        raise UserError(f"--classes takes comma-separated integers, not '{classes}'") from None
    registry = default_registry()
    settings = build_config(registry, flags, _str(config))
    panel = progress_display(quiet)
    try:
        with stop_on_ctrl_c() as stop_requested, panel or nullcontext():
            done = run_sweep(registry, settings, outputs, wanted, parse_shard(shard), stop_requested=stop_requested,
                             progress=panel.update if panel else None, say=lambda m: typer.echo(m, err=True))
    except Interrupted as exc:
        typer.echo(f"{exc}\n(or rerun the same `mimic sweep` command: it resumes)", err=True)
        raise typer.Exit(130)
    if as_json:
        from .runfolder import summary

        typer.echo(json.dumps({"sweep_folder": str(outputs), "index": str(outputs / "index.html"),
                               "runs": [summary(run) for run in done]}, indent=2))
    else:
        typer.echo(f"sweep folder: {outputs}\nindex:        {outputs / 'index.html'}")


@app.command()
@with_settings("class_index", "prompts", "question", "answer", "iterations", "batch_size", "seed", "device")
def compare(
    flags: dict,
    run_paths: List[Path] = typer.Argument(None, metavar="[RUN_OR_SWEEP]...", help="With --runs: the run and "
                                           "sweep folders to compare."),
    models: Optional[str] = typer.Option(None, help="Comma-separated adapter ids, e.g. toy-shapes,toy-shapes-qwen."),
    outputs: Path = typer.Option(..., help="The comparison folder (a folder of runs per model, grid, report)."),
    classes: Optional[str] = typer.Option(None, help="Comma-separated class indices of the prompt file, or 'all' "
                                          "(default: --class-index, else the file's first)."),
    same_settings: bool = typer.Option(False, "--same-settings", help="The first model's settings for every model "
                                       "(default: each model's own defaults)."),
    processes: Optional[int] = typer.Option(None, min=1, help="Models inverted at once, each in a process of its "
                                            "own on one device (default: one per GPU when several are visible)."),
    runs: bool = typer.Option(False, "--runs", help="Compare the run or sweep folders given as arguments (made "
                              "elsewhere, e.g. one sweep per model): no inversion, only the scoring."),
    checkpoint: List[str] = typer.Option([], help="MODEL=PATH, once per model that needs one."),
    stats: List[str] = typer.Option([], help="MODEL=PATH: that model's feature statistics (a file, or a folder "
                                    "of per-class files), once per model; --scale feature=0 runs without."),
    as_json: bool = typer.Option(False, "--json", help="End with the comparison's summary (comparison.json) as JSON "
                                 "on standard output.")):
    """Several concepts, the same seed, several models: a concept x model grid, each model's images
    scored by every model (P(target) and whether its greedy answer names the target) per concept
    and averaged, and, where a plugin has a verifier for the concepts (the toy's), its accuracy."""
    from .compare import compare_runs, default_processes, run_compare

    say = lambda m: typer.echo(m, err=True)
    if runs:
        given = [name for name, value in (("--models", models), ("--classes", classes), ("--processes", processes),
                                          ("--checkpoint", checkpoint), ("--stats", stats),
                                          ("--same-settings", same_settings)) if value] + [
            f"--{k.replace('_', '-')}" for k in flags if k != "device"]
        if given or not run_paths:
            raise UserError(f"--runs scores existing runs: {', '.join(given)} does not apply" if given else
                            "--runs needs the run or sweep folders to compare")
        folder = compare_runs(default_registry(), run_paths, outputs, device=flags.get("device"), say=say)
    else:
        if run_paths:
            raise UserError(f"unexpected argument '{run_paths[0]}' (run or sweep folders go with --runs)")
        if not models:
            raise UserError("compare needs --models (or --runs and run or sweep folders)")
        folder = run_compare(default_registry(), [m.strip() for m in models.split(",") if m.strip()], flags, outputs,
                             _per_model(checkpoint, "--checkpoint"), _per_model(stats, "--stats"),
                             classes=_classes(classes), same_settings=same_settings,
                             processes=processes or default_processes(flags.get("device")), say=say)
    summary = json.loads((folder / "comparison.json").read_text())
    if as_json:
        typer.echo(json.dumps({"comparison_folder": str(folder), "report": str(folder / "report.html"), **summary},
                              indent=2))
    else:
        typer.echo(f"comparison folder: {folder}\nreport:            {folder / 'report.html'}")
    rows = summary["models"]
    failed = [model for model, row in rows.items() if "error" in row or "scoring_error" in row]
    if failed:  # the report is complete, but a script must not take it for a full comparison
        typer.echo(f"failed: {', '.join(failed)} (see the report)", err=True)
        raise typer.Exit(1)


def _classes(text: Optional[str]):
    """--classes: None, "all", or the class indices."""
    if text is None or text.strip() == "all":
        return text and "all"
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise UserError(f"--classes takes comma-separated integers or 'all', not '{text}'") from None


SITES_HELP = InversionConfig.__dataclass_fields__["feature_sites"].metadata["help"]  # as `mimic invert` says


@app.command()
def stats(
    images: Path = typer.Option(..., help="Folder of real images of the concept (searched recursively)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Adapter id (default: the bundled toy model)."),
    checkpoint: Optional[str] = typer.Option(None, help="Local checkpoint folder or hub id."),
    revision: Optional[str] = typer.Option(None),
    out: Path = typer.Option(Path("stats"), help="Folder for the statistics file."),
    class_index: Optional[int] = typer.Option(None, help="Record the concept, so `--stats FOLDER` finds it."),
    feature_sites: Optional[str] = typer.Option(None, help=SITES_HELP),
    batch_size: int = typer.Option(32, min=1),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
):
    """Compute target feature statistics from a folder of images (runs only the vision tower)."""
    from .engine import load_model
    from .features import compute_stats

    adapter = load_model(model, checkpoint=checkpoint, revision=revision, device=device, dtype=dtype)
    result = compute_stats(adapter, adapter.model_id, images, batch_size=batch_size, class_index=class_index,
                           feature_sites=feature_sites, on_skip=lambda message: typer.echo(message, err=True))
    path = result.save(out)
    typer.echo(f"{result.meta['image_count']} images, {len(result.sites)} sites -> {path}")


@app.command()
def ask(
    images: List[Path] = typer.Option(..., "--images", help="An image or a folder of images; repeat for more."),
    question: str = typer.Option(..., help="The question asked about every image."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Adapter id (default: the bundled toy model)."),
    checkpoint: Optional[str] = typer.Option(None, help="Local checkpoint folder or hub id."),
    top: int = typer.Option(3, min=1, help="How many of the most probable answers to list."),
    max_new_tokens: int = typer.Option(16, min=1),
    batch_size: int = typer.Option(8, min=1),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per image, as lines."),
):
    """Ask a model a question about images: its greedy answer, and its most probable answers with P."""
    from .ask import ask as ask_model, image_files
    from .engine import load_model

    files = image_files(images)  # before the model loads
    adapter = load_model(model, checkpoint=checkpoint, device=device, dtype=dtype)
    for row in ask_model(adapter, files, question, top=top, max_new_tokens=max_new_tokens, batch_size=batch_size):
        if as_json:
            typer.echo(json.dumps(row))
        else:
            ranked = ", ".join(f"{a['answer']!r} {a['p']:.3f}" for a in row["top"])
            typer.echo(f"{row['image']}: {row['answer']}  (top: {ranked})")


@app.command()
def report(run: Path = typer.Argument(..., help="A run folder.")):
    """(Re)write a run folder's report.html."""
    from .report import write_report

    if not (run / "manifest.json").is_file():
        raise UserError(f"'{run}' is not a run folder (no manifest.json)")
    typer.echo(str(write_report(run)))


add_lm_commands(app)  # capture, concepts, steer, shift
add_icl_commands(app)  # icl train, eval, apply
add_sae_commands(app)  # sae train, eval, import, layers, features


def _per_model(pairs: list[str], option: str) -> dict[str, str]:
    """['MODEL=PATH', ...] -> {model id: PATH}."""
    paths = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep:
            raise UserError(f"{option} takes MODEL=PATH here, got '{pair}'")
        paths[default_registry().adapter_spec(name).id] = path
    return paths


def _str(value) -> Optional[str]:
    return None if value is None else str(value)


def _register_plugin_commands() -> None:
    try:
        registry = default_registry()
        for plugin in registry.implementers("register_commands"):
            before = list(app.registered_commands), list(app.registered_groups)
            if not registry.call(plugin, "register_commands", cli=app):  # a failed plugin adds no commands
                app.registered_commands[:], app.registered_groups[:] = before
    except UserError as exc:  # e.g. two plugins claim one name: still let `mimic plugins` etc. explain
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


_register_plugin_commands()


def main() -> None:
    app()
