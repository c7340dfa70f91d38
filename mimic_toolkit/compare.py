"""`mimic compare`: one concept, the same seed and settings, several models; then every model's
images scored by every model (a transfer matrix: what one model "sees" that another recognises).
A model that fails in any way (a corrupt checkpoint, out of memory) is reported and the others still
run. A rerun after a crash keeps the finished runs of the models (they took long) and resumes an
interrupted one, when they were made with the same settings."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from PIL import Image, ImageDraw

from .atomic import PartialFolder, refuse_existing, writing
from .errors import UserError
from .htmlkit import heading, image, page, span, table
from .registry import Registry
from .engine import format_prompt
from .runfolder import RunFolder
from .session import (RESUME_MAY_CHANGE, Processes, build_config, check_inputs, concept_of, load_configured,
                      run_inversion)

THUMB = 128


def run_compare(registry: Registry, models: list[str], flags: dict, folder: Path,
                checkpoints: dict[str, str] | None = None, stats: dict[str, str] | None = None, say=print) -> Path:
    """`checkpoints` and `stats`: model id -> its checkpoint and its feature statistics (a file or
    a folder of per-class files). Every model's inputs are checked before any model runs, and all
    that is missing is named in one error; a model that then fails while running is reported."""
    specs = [registry.adapter_spec(m) for m in models]  # unknown names fail before any work
    refuse_existing(folder, "--outputs")
    configs, problems = {}, []
    for spec in specs:
        settings = {**flags, "model": spec.id, "checkpoint": (checkpoints or {}).get(spec.id) or flags.get("checkpoint"),
                    "stats": (stats or {}).get(spec.id) or flags.get("stats")}
        try:
            configs[spec.id] = build_config(registry, settings)
            check_inputs(configs[spec.id], spec)
        except UserError as exc:
            problems.append(f"{spec.id}: {exc}")
    if problems:
        raise UserError("; ".join(problems))
    output = PartialFolder(folder)  # never `start`ed: that would remove an earlier attempt's finished runs
    work = output.path
    with writing(work):
        work.mkdir(parents=True, exist_ok=True)
    results = {}
    for model, config in configs.items():
        config.outputs = str(work / model)
        notes = [] if config.scales.get("feature") else ["feature statistics off"]
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # each model's own peak, not the largest so far
        try:
            run = _run_model(registry, model, config, say)
            results[model] = {"run": run, "config": config, "notes": notes, **_run_summary(run)}
        except Exception as exc:  # any kind: one bad model must not cost the others' hours
            results[model] = {"error": _one_line(exc), "notes": notes}
            say(f"{model}: failed: {results[model]['error']}")
    matrix = _transfer_matrix(registry, results, say)
    _write(work, results, matrix)
    return output.finish()


def _run_model(registry: Registry, model: str, config, say) -> Path:
    """The model's run: kept from an earlier attempt, resumed from its checkpoint, or started."""
    final = Path(config.outputs)
    if final.is_dir():
        stored = yaml.safe_load((final / "config.yaml").read_text(encoding="utf-8"))
        changed = sorted(k for k, v in config.to_dict().items()
                         if v is not None and k not in RESUME_MAY_CHANGE and stored.get(k) != v)
        if changed:
            raise UserError(f"'{final}' was made with other settings ({', '.join(changed)}); remove it to run "
                            "the model again")
        say(f"{model}: finished earlier, kept")
        return final
    resume = str(RunFolder(final).path) if RunFolder(final).checkpoint_path.is_file() else None
    if resume:  # checked, as by `mimic invert --resume`, to have been made with these settings
        config = build_config(registry, config.to_dict(), resume=resume)
    say(f"{model}: {'resuming' if resume else 'inverting'}")
    return run_inversion(registry, config, resume=resume)


def _one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _run_summary(run: Path) -> dict:
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    manifest = json.loads((run / "manifest.json").read_text())
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"terms": last["terms"], "p_answer": last["p_answer"], "peak_gib": peak,
            "ms_per_step": manifest["timings"][-1]["ms_per_step"], "target": manifest["concept"]["target"]}


def _transfer_matrix(registry, results, say) -> dict:
    """P(target) and whether the greedy answer names the target, for every (inverted by, scored by).
    Each judge is loaded again, one at a time: keeping every model resident from its own run would
    need all of them in GPU memory at once. A judge that fails is noted in its row; the others score."""
    done = {m: r for m, r in results.items() if "error" not in r}
    matrix = {}
    for judge, result in done.items():
        try:
            matrix.update(_judge(registry, judge, result, done))
        except Exception as exc:
            result["scoring_error"] = _one_line(exc)
            say(f"{judge}: scoring failed: {result['scoring_error']}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return matrix


def _judge(registry, judge: str, result: dict, done: dict) -> dict:
    """One judge's row of the matrix: its scores of every model's images."""
    scores = {}
    config = result["config"]
    spec = registry.adapter_spec(judge)
    adapter = load_configured(registry, config, Processes(config.device).device)
    adapter.use_resolution(config.resolution or adapter.resolution)  # unset here for a kept or resumed run
    turns = list(concept_of(config, spec).chat_sequence)
    prompt, question = format_prompt(adapter, turns), format_prompt(adapter, turns, target=False)
    target = turns[-1][1].lower()
    for source, other in done.items():
        pictures = [Image.open(p) for p in sorted((other["run"] / "images").glob("*.png"))]
        images = adapter.preprocess(pictures)
        p = adapter.answer_probability(images, prompt)
        answers = adapter.tokenizer.batch_decode(adapter.generate(images, question, prompt.n_target + 3),
                                                 skip_special_tokens=True)
        scores[(source, judge)] = {"p_target": p.mean().item(),
                                   "names_target": sum(target in a.lower() for a in answers) / len(answers)}
    return scores


def _write(work: Path, results: dict, matrix: dict) -> None:
    _grid(results).save(work / "grid.png")
    rows = {m: {k: v for k, v in r.items() if k not in ("run", "config")} for m, r in results.items()}
    table = [{"inverted_by": s, "scored_by": j, **v} for (s, j), v in matrix.items()]
    (work / "comparison.json").write_text(json.dumps({"models": rows, "transfer": table}, indent=2, default=str))
    (work / "report.html").write_text(_report(work, rows, matrix), encoding="utf-8")


def _grid(results: dict) -> Image.Image:
    """A labelled row per model; a failed model's row says so."""
    label_width, gap = 160, 4
    per_row = max([len(list((r["run"] / "images").glob("*.png"))) for r in results.values() if "run" in r] or [1])
    canvas = Image.new("RGB", (label_width + per_row * (THUMB + gap), len(results) * (THUMB + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (model, result) in enumerate(results.items()):
        top = row * (THUMB + gap)
        draw.text((4, top + THUMB // 2 - 6), model, fill="black")
        if "error" in result:
            draw.text((label_width, top + THUMB // 2 - 6), "failed: " + result["error"][:60], fill="red")
            continue
        for i, path in enumerate(sorted((result["run"] / "images").glob("*.png"))):
            thumb = Image.open(path).convert("RGB").resize((THUMB, THUMB), Image.NEAREST)
            canvas.paste(thumb, (label_width + i * (THUMB + gap), top))
    return canvas


def _report(work: Path, rows: dict, matrix: dict) -> str:
    models = list(rows)
    transfer = [[f"inverted by {source}", *(
        f"{matrix[(source, j)]['p_target']:.3f} / {matrix[(source, j)]['names_target']:.0%}"
        if (source, j) in matrix else "-" for j in models)] for source in models]
    summary = []
    for model, r in rows.items():
        if "error" in r:
            summary.append([model, span(r["error"], "error")])
            continue
        terms = ", ".join(f"{k} {v:.3g}" for k, v in r["terms"].items())
        peak = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "- (CPU)"
        notes = r["notes"] + ([f"scoring failed: {r['scoring_error']}"] if "scoring_error" in r else [])
        summary.append([model, f"{r['p_answer']:.3f}", f"{r['ms_per_step']} ms", peak, f"{terms} {'; '.join(notes)}"])
    return page("mimic compare", heading("mimic compare"), image((work / "grid.png").read_bytes(), alt="grid"),
                heading("Per model", 2),
                table(["model", "P(target)", "time per step", "peak memory", "final loss terms"], summary),
                heading("Transfer: P(target) / greedy answer names the target", 2),
                table(["", *(f"scored by {m}" for m in models)], transfer, row_headers=True))
