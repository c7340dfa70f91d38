"""`mimic compare`: several concepts, the same seed, several models; then every model's images
scored by every model (a transfer matrix per concept and averaged over concepts: what one model
"sees" that another recognises) and, where a plugin has an independent verifier for the concepts
(the toy's), by that verifier.

One concept definition for all models: the concepts come from one prompt file (`--prompts`, else
the first model's own), so a class index means the same thing to every model. Settings are each
model's own defaults, or the first model's for all (`same_settings`); the report says which. A
model that fails in any way (a corrupt checkpoint, out of memory) is reported and the others still
run. A rerun after a crash keeps the finished runs (they took long) and resumes an interrupted one,
when they were made with the same settings. With `processes` > 1 the models are inverted by that
many processes at once, each model in one process pinned to one device (one GPU each, when there
are several); the scoring comes after, in this process, so the report is the one a sequential run
writes. `compare_runs` builds the same comparison from run or sweep folders made elsewhere."""
from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import torch
import yaml
from PIL import Image, ImageDraw

from .adapter.vision import image_tensor
from .atomic import PARTIAL, PartialFolder, refuse_existing, writing
from .engine import format_prompt
from .errors import UserError
from .htmlkit import heading, image, page, paragraph, span, table
from .live import PlainProgress
from .prompts import IMAGENET_PROMPTS, direct, load_prompts, select
from .registry import Registry
from .runfolder import RunFolder
from .session import (RESUME_MAY_CHANGE, Processes, active_statistics_terms, build_config, check_inputs, concept_of,
                      load_configured, run_inversion)

THUMB = 128
# what a model's own geometry and files decide, never shared by --same-settings
PER_MODEL = {"model", "checkpoint", "stats", "outputs", "revision", "trust_remote_code", "resolution"}
# the settings the report's table shows per model
SHOWN = ("iterations", "batch_size", "lr", "parameterisation", "feature_form", "resolution", "seed")


def run_compare(registry: Registry, models: list[str], flags: dict, folder: Path,
                checkpoints: dict[str, str] | None = None, stats: dict[str, str] | None = None, *,
                classes: list[int] | str | None = None, same_settings: bool = False, processes: int = 1,
                say=print) -> Path:
    """`checkpoints` and `stats`: model id -> its checkpoint and its feature statistics (a file, or
    a folder of per-class files). `classes`: class indices of the prompt file, or "all". Every
    model's inputs for every concept are checked before any model runs, and all that is missing is
    named in one error; a model that then fails while running is reported."""
    specs = _unique_specs(registry, models, say)
    refuse_existing(folder, "--outputs")
    concepts, prompts = _concepts(registry, specs[0], flags, classes)
    settings = _settings(registry, specs, flags, checkpoints or {}, stats or {}, same_settings)
    configs, problems = {}, []
    for spec in specs:
        configs[spec.id] = {}
        for key, concept in concepts.items():
            asked = {"question": concept.chat_sequence[-1][0], "answer": concept.target} if flags.get("question") else {
                "class_index": concept.class_index}
            given = {**settings[spec.id], "prompts": prompts, **asked}
            try:
                config = build_config(registry, given)
                check_inputs(config, spec, terms=registry.objective_specs(), registry=registry)
                source = config.stats or spec.stats
                uses_stats = active_statistics_terms(config, registry.objective_specs())
                if len(concepts) > 1 and uses_stats and source and not Path(source).is_dir():
                    raise UserError(f"the statistics file '{source}' is one concept's; with several concepts "
                                    "pass a folder of per-class files (`mimic stats --class-index N`)")
                configs[spec.id][key] = config
            except UserError as exc:
                problems.append(f"{spec.id}: {exc}")
                break  # one line per model: its other concepts most likely lack the same
    if problems:
        raise UserError("; ".join(problems))
    output = PartialFolder(folder)  # never `start`ed: that would remove an earlier attempt's finished runs
    work = output.path
    with writing(work):
        work.mkdir(parents=True, exist_ok=True)
    for model, by_concept in configs.items():
        for key, config in by_concept.items():
            config.outputs = str(work / model / key)
    processes = max(1, min(processes, len(configs)))
    devices = _devices(flags.get("device"), processes)
    if processes == 1:
        results = {model: _invert_model(registry, model, by_concept, say) for model, by_concept in configs.items()}
    else:
        results = _invert_in_processes(configs, devices, processes, say)
    for model, result in results.items():
        result["configs"] = configs[model]
    how = {"settings": "shared" if same_settings else "per model", "settings_from": specs[0].id if same_settings else None,
           "processes": processes, "prompts": prompts}
    return _score_and_write(registry, output, results, concepts, how, say)


def compare_runs(registry: Registry, paths: list[Path], folder: Path, *, device: str | None = None,
                 say=print) -> Path:
    """The comparison of run folders and sweep folders made elsewhere (one sweep per model on a
    cluster, say): no inversion, only the scoring (on `device`, else the runs' own). Runs of one
    concept must agree on it."""
    refuse_existing(folder, "--outputs")
    results, concepts = {}, {}
    for run in _run_folders(paths):
        config = _config_of_run(registry, run)
        config.device = device or config.device
        spec = registry.adapter_spec(config.model)
        concept = concept_of(config, spec)
        key = _key(concept)
        if key in concepts and concepts[key].chat_sequence != concept.chat_sequence:
            raise UserError(f"run '{run}' inverted {key} as {concept.chat_sequence!r}, another run as "
                            f"{concepts[key].chat_sequence!r}: one concept must be the same for every model")
        concepts[key] = concept
        result = results.setdefault(spec.id, {"runs": {}, "configs": {}, "notes": []})
        if key in result["runs"]:
            raise UserError(f"runs '{result['runs'][key]}' and '{run}' both invert {key} on '{spec.id}': pass one")
        result["runs"][key], result["configs"][key] = run, config
        result.update(_summaries(result.get("summaries", {}), key, run, peak_gib=None))  # not measured here
    if not results:
        raise UserError("no finished runs in " + ", ".join(f"'{p}'" for p in paths))
    output = PartialFolder(folder)
    with writing(output.path):
        output.path.mkdir(parents=True, exist_ok=True)
    how = {"settings": "as each run was made", "settings_from": None, "processes": 1, "prompts": None,
           "runs": [str(p) for p in paths]}
    return _score_and_write(registry, output, results, dict(sorted(concepts.items(), key=lambda kv: _order(kv[0]))),
                            how, say)


# -- the concepts and the settings ---------------------------------------------------------------
def _unique_specs(registry: Registry, models: list[str], say) -> list:
    """Each model once: aliases of one model (toy-shapes,toy) are merged, not run twice."""
    specs, seen = [], {}
    for name in models:
        spec = registry.adapter_spec(name)  # unknown names fail before any work
        if spec.id in seen:
            say(f"{name}: the same model as {seen[spec.id]}, merged")
            continue
        seen[spec.id] = name
        specs.append(spec)
    if not specs:
        raise UserError("--models names no model")
    return specs


def _concepts(registry: Registry, first, flags: dict, classes) -> tuple[dict, str]:
    """{folder name: concept} and the one prompt file every model's runs read them from."""
    prompts = flags.get("prompts") or first.prompts or str(IMAGENET_PROMPTS)
    if flags.get("question") is not None or flags.get("answer") is not None:
        if classes:
            raise UserError("--classes and --question/--answer exclude each other")
        if not (flags.get("question") and flags.get("answer")):
            raise UserError("--question and --answer go together")
        asked = direct(flags["question"], flags["answer"])
        known = [c for c in load_prompts(prompts) if c.target.strip().casefold() == asked.target.strip().casefold()]
        concept = replace(asked, class_index=known[0].class_index, class_name=known[0].class_name) if known else asked
        return {_key(concept): concept}, prompts
    if classes and flags.get("class_index") is not None:
        raise UserError("--classes and --class-index exclude each other")
    every = load_prompts(prompts)
    if classes == "all":
        chosen = every
    elif classes:
        chosen = [select(every, index, f"prompt file '{prompts}'") for index in dict.fromkeys(classes)]
    else:
        chosen = [select(every, flags.get("class_index"), f"prompt file '{prompts}'")]
    return {_key(c): c for c in chosen}, prompts


def _key(concept) -> str:
    return f"c{concept.class_index}" if concept.class_index >= 0 else "direct"


def _order(key: str):
    return (0, int(key[1:])) if key[1:].isdigit() else (1, key)


def _settings(registry, specs, flags, checkpoints, stats, same_settings) -> dict[str, dict]:
    """Each model's settings before the concept: its own defaults under the flags, or, shared, the
    first model's resolved settings (its geometry and files excepted) for every model."""
    flags = {k: v for k, v in flags.items() if k not in ("class_index", "question", "answer", "prompts")}
    own = {s.id: {**flags, "model": s.id, "checkpoint": checkpoints.get(s.id) or flags.get("checkpoint"),
                  "stats": stats.get(s.id) or flags.get("stats")} for s in specs}
    if not same_settings:
        return own
    first = build_config(registry, own[specs[0].id]).to_dict()
    shared = {k: v for k, v in first.items() if k not in PER_MODEL and k not in ("class_index", "question", "answer",
                                                                               "prompts")}
    return {s.id: {**own[s.id], **shared} for s in specs}


# -- inverting -----------------------------------------------------------------------------------
def _invert_model(registry: Registry, model: str, configs: dict, say) -> dict:
    """One model's runs, one per concept, loading the model once. Any failure ends this model's
    part (the runs it finished stay in the folder) and is recorded; it never ends the comparison."""
    notes = [] if active_statistics_terms(next(iter(configs.values())), registry.objective_specs()) else \
        ["feature statistics off"]
    result = {"runs": {}, "notes": notes}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # each model's own peak, not the largest so far
    adapter = []  # loaded on the first concept that needs the model, then reused
    try:
        for n, (key, config) in enumerate(configs.items(), 1):
            run = _run_model(registry, model, config, say, adapter, label=f"{model} {key} ({n}/{len(configs)})")
            result["runs"][key] = run
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
            result.update(_summaries(result.get("summaries", {}), key, run, peak))
            summary = result["summaries"][key]
            say(f"{model} {key}: P(target) {summary['p_answer']:.3f}, {summary['ms_per_step']} ms/step")
    except Exception as exc:  # any kind: one bad model must not cost the others' hours
        result["error"] = _one_line(exc)
        say(f"{model}: failed: {result['error']}")
    return result


def _run_model(registry: Registry, model: str, config, say, adapter: list | None = None, label: str = "") -> Path:
    """One run: kept from an earlier attempt, resumed from its checkpoint, or started. `adapter`:
    a one-item list holding the loaded model once a run loaded it; `label`: what progress lines say."""
    label = label or model
    final = Path(config.outputs)
    if final.is_dir():
        stored = yaml.safe_load((final / "config.yaml").read_text(encoding="utf-8"))
        changed = sorted(k for k, v in config.to_dict().items()
                         if v is not None and k not in RESUME_MAY_CHANGE and stored.get(k) != v)
        if changed:
            raise UserError(f"'{final}' was made with other settings ({', '.join(changed)}); remove it to run "
                            "the model again")
        say(f"{label}: finished earlier, kept")
        return final
    resume = str(RunFolder(final).path) if RunFolder(final).checkpoint_path.is_file() else None
    if resume:  # checked, as by `mimic invert --resume`, to have been made with these settings
        config = build_config(registry, config.to_dict(), resume=resume)
    say(f"{label}: {'resuming' if resume else 'inverting'}")
    adapter = [] if adapter is None else adapter
    if not adapter:
        adapter.append(load_configured(registry, config, Processes(config.device).device))
    with PlainProgress(_Prefixed(sys.stderr, f"{model} {final.name}: "), every_s=30) as progress:
        return run_inversion(registry, config, resume=resume, adapter=adapter[0], progress=progress.update)


class _Prefixed:
    """A text stream that starts each line with a prefix (progress lines of several runs at once)."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.at_line_start = stream, prefix, True

    def write(self, text: str) -> None:
        for piece in text.splitlines(keepends=True):
            self.stream.write((self.prefix if self.at_line_start else "") + piece)
            self.at_line_start = piece.endswith("\n")

    def flush(self) -> None:
        self.stream.flush()


def _devices(option: str | None, processes: int) -> list[str | None]:
    """One device per process: GPU i for process i when several are visible, else the run's own."""
    if processes > 1 and (option or "auto") in ("auto", "cuda") and torch.cuda.device_count() > 1:
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(processes)]
    return [None] * processes


def default_processes(option: str | None) -> int:
    """With several GPUs visible (and no device chosen), a process per GPU; else one."""
    return torch.cuda.device_count() if (option or "auto") in ("auto", "cuda") and torch.cuda.device_count() > 1 else 1


def _invert_in_processes(configs: dict, devices: list, processes: int, say) -> dict:
    """Each model in a process of its own (spawned: a CUDA context does not survive a fork), at most
    `processes` at once, model i on device i; a process that dies is that model's failure."""
    threads = max(1, (os.cpu_count() or 1) // processes)
    jobs = {}
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        for i, (model, by_concept) in enumerate(configs.items()):
            device = devices[i % processes]
            dicts = {k: {**c.to_dict(), **({"device": device} if device else {})} for k, c in by_concept.items()}
            say(f"{model}: in a process of its own{' on ' + device if device else ''}")
            jobs[model] = pool.submit(_model_process, model, dicts, threads)
        results = {}
        for model, job in jobs.items():
            try:
                results[model] = job.result()
            except Exception as exc:  # the process itself died (killed, out of memory)
                results[model] = {"runs": {}, "notes": [], "error": _one_line(exc)}
                say(f"{model}: failed: {results[model]['error']}")
    for result in results.values():
        result["runs"] = {k: Path(p) for k, p in result["runs"].items()}
    return results


def _model_process(model: str, config_dicts: dict, threads: int) -> dict:
    """A worker process: rebuilds the registry and the configs, inverts the model's concepts."""
    from .registry import build_registry

    torch.set_num_threads(threads)
    device = next(iter(config_dicts.values())).get("device") or ""
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)  # this process's peak memory and default device are its GPU's
    registry = build_registry()
    configs = {k: build_config(registry, d) for k, d in config_dicts.items()}
    for key, config in configs.items():
        config.outputs = config_dicts[key]["outputs"]
    say = lambda message: print(message, file=sys.stderr, flush=True)
    result = _invert_model(registry, model, configs, say)
    return {**result, "runs": {k: str(p) for k, p in result["runs"].items()}}


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _summaries(summaries: dict, key: str, run: Path, peak_gib: float | None) -> dict:
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    manifest = json.loads((run / "manifest.json").read_text())
    summaries[key] = {"terms": last["terms"], "p_answer": last["p_answer"], "peak_gib": peak_gib,
                      "ms_per_step": manifest["timings"][-1]["ms_per_step"], "target": manifest["concept"]["target"]}
    return {"summaries": summaries}


def _run_folders(paths: list[Path]) -> list[Path]:
    """Finished run folders, given as run folders or as folders of runs (a sweep, one model's part
    of a comparison); unfinished runs (`.partial`) are left out."""
    found = []
    for path in paths:
        if (path / "manifest.json").is_file():
            found.append(path)
        elif path.is_dir() and any(path.glob("*/manifest.json")):
            found += sorted((p.parent for p in path.glob("*/manifest.json") if not p.parent.name.endswith(PARTIAL)),
                            key=lambda p: _order(p.name))
        else:
            raise UserError(f"'{path}' is neither a run folder nor a folder of runs (a sweep)")
    return found


# -- scoring -------------------------------------------------------------------------------------
def _score_and_write(registry, output: PartialFolder, results: dict, concepts: dict, how: dict, say) -> Path:
    for result in results.values():  # as the runs recorded them: the same however they were run
        first = next(iter(result["runs"].values()), None)
        stored = yaml.safe_load((first / "config.yaml").read_text(encoding="utf-8")) if first else {}
        result["settings"] = {k: stored.get(k) for k in SHOWN}
    matrix = _transfer_matrix(registry, results, concepts, say)
    verdicts = _verify(registry, results, concepts, say)
    _write(output.path, results, concepts, matrix, verdicts, how)
    return output.finish()


def _transfer_matrix(registry, results: dict, concepts: dict, say) -> dict:
    """(concept, inverted by, scored by) -> P(target) and whether the greedy answer names the target.
    Each judge is loaded again, once, one at a time: keeping every model resident from its own run
    would need all of them in memory at once. A judge that fails is noted; the others score."""
    done = {m: r for m, r in results.items() if "error" not in r}
    matrix = {}
    for n, (judge, result) in enumerate(done.items(), 1):
        say(f"scoring with {judge} ({n}/{len(done)})")
        try:
            matrix.update(_judge(registry, judge, result, done, concepts))
        except Exception as exc:
            result["scoring_error"] = _one_line(exc)
            say(f"{judge}: scoring failed: {result['scoring_error']}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return matrix


def _judge(registry, judge: str, result: dict, done: dict, concepts: dict) -> dict:
    """One judge's scores of every model's images of every concept."""
    scores = {}
    config = _any_config(registry, result)
    adapter = load_configured(registry, config, Processes(config.device).device)
    adapter.use_resolution(config.resolution or adapter.resolution)  # unset here for a kept or resumed run
    for key, concept in concepts.items():
        turns = list(concept.chat_sequence)
        prompt, question = format_prompt(adapter, turns), format_prompt(adapter, turns, target=False)
        target = turns[-1][1].lower()
        for source, other in done.items():
            if key not in other["runs"]:
                continue
            images = adapter.preprocess([Image.open(p) for p in _images(other["runs"][key])])
            p = adapter.answer_probability(images, prompt)
            answers = adapter.tokenizer.batch_decode(adapter.generate(images, question, prompt.n_target + 3),
                                                     skip_special_tokens=True)
            scores[(key, source, judge)] = {"p_target": p.mean().item(),
                                            "names_target": sum(target in a.lower() for a in answers) / len(answers)}
    return scores


def _any_config(registry, result: dict):
    """A config that loads the model: one of its runs' own (built here, or read back from a run)."""
    if result.get("configs"):
        return next(iter(result["configs"].values()))
    return _config_of_run(registry, next(iter(result["runs"].values())))


def _config_of_run(registry, run: Path):
    """A finished run's settings, as `--config RUN/config.yaml` reads them."""
    return build_config(registry, {}, str(run / "config.yaml"))


def _verify(registry, results: dict, concepts: dict, say) -> dict:
    """(model, concept) -> the verifier's scores, where a plugin has a verifier for the concept."""
    verdicts = {}
    for model, result in results.items():
        for key, run in result["runs"].items():
            images = torch.stack([image_tensor(Image.open(p).convert("RGB")) for p in _images(run)])
            verdict = registry.ask("mimic_verify_images", images=images, concept=concepts[key])
            if verdict is not None:
                verdicts[(model, key)] = {name: float(value) for name, value in verdict.items()}
    if verdicts:
        say("verifier: " + "; ".join(f"{m} {_mean_text(_mean_verdict(verdicts, m))}" for m in results
                                     if any(v[0] == m for v in verdicts)))
    return verdicts


def _images(run: Path) -> list[Path]:
    return sorted((run / "images").glob("*.png"))


def _mean_verdict(verdicts: dict, model: str) -> dict:
    rows = [v for (m, _), v in verdicts.items() if m == model]
    return {name: sum(r[name] for r in rows) / len(rows) for name in rows[0]} if rows else {}


def _mean_text(scores: dict) -> str:
    return ", ".join(f"{name} {value:.2f}" for name, value in scores.items())


def _mean_matrix(matrix: dict, models: list[str]) -> dict:
    """(inverted by, scored by) -> the means over the concepts both have, and how many."""
    means = {}
    for source in models:
        for judge in models:
            cells = [v for (_, s, j), v in matrix.items() if (s, j) == (source, judge)]
            if cells:
                means[(source, judge)] = {"p_target": sum(c["p_target"] for c in cells) / len(cells),
                                          "names_target": sum(c["names_target"] for c in cells) / len(cells),
                                          "concepts": len(cells)}
    return means


# -- the report ----------------------------------------------------------------------------------
def _write(work: Path, results: dict, concepts: dict, matrix: dict, verdicts: dict, how: dict) -> None:
    models = list(results)
    means = _mean_matrix(matrix, models)
    _grid(results, concepts).save(work / "grid.png")
    rows = {m: {"runs": {k: _where(p, work) for k, p in r["runs"].items()},
                **{k: v for k, v in r.items() if k not in ("runs", "configs")}} for m, r in results.items()}
    for model in models:
        if any(m == model for m, _ in verdicts):
            rows[model]["verifier"] = _mean_verdict(verdicts, model)
    data = {"how": how,
            "concepts": {k: {"class_index": c.class_index, "class_name": c.class_name, "target": c.target}
                         for k, c in concepts.items()},
            "models": rows,
            "transfer": [{"concept": k, "inverted_by": s, "scored_by": j, **v} for (k, s, j), v in matrix.items()],
            "transfer_mean": [{"inverted_by": s, "scored_by": j, **v} for (s, j), v in means.items()],
            "verifier": [{"model": m, "concept": k, **v} for (m, k), v in verdicts.items()]}
    (work / "comparison.json").write_text(json.dumps(data, indent=2, default=str))
    (work / "report.html").write_text(_report(work, rows, concepts, matrix, means, how), encoding="utf-8")


def _where(run: Path, work: Path) -> str:
    """A run inside the comparison folder by its place there (the folder may move), others in full."""
    run = Path(run).resolve()
    return str(run.relative_to(work.resolve())) if run.is_relative_to(work.resolve()) else str(run)


def _grid(results: dict, concepts: dict) -> Image.Image:
    """Rows models, columns concepts (with one concept: all of its images); a failed model's row
    says so, and a concept a model has no run of is left blank."""
    label_width, gap, top_gap = 160, 4, 16
    columns = [(key, None) for key in concepts]
    if len(concepts) == 1:
        key = next(iter(concepts))
        count = max([len(_images(r["runs"][key])) for r in results.values() if key in r["runs"]] or [1])
        columns = [(key, i) for i in range(count)]
    thumb = THUMB if len(columns) <= 8 else 64
    canvas = Image.new("RGB", (label_width + len(columns) * (thumb + gap), top_gap + len(results) * (thumb + gap)),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for col, (key, i) in enumerate(columns):
        if i is None or i == 0:
            draw.text((label_width + col * (thumb + gap), 2), concepts[key].class_name[:thumb // 6], fill="black")
    for row, (model, result) in enumerate(results.items()):
        top = top_gap + row * (thumb + gap)
        draw.text((4, top + thumb // 2 - 6), model, fill="black")
        if "error" in result and not result["runs"]:
            draw.text((label_width, top + thumb // 2 - 6), "failed: " + result["error"][:60], fill="red")
            continue
        for col, (key, i) in enumerate(columns):
            files = _images(result["runs"][key]) if key in result["runs"] else []
            if len(files) > (i or 0):
                picture = Image.open(files[i or 0]).convert("RGB").resize((thumb, thumb), Image.NEAREST)
                canvas.paste(picture, (label_width + col * (thumb + gap), top))
    return canvas


def _cell(scores: dict | None) -> str:
    return f"{scores['p_target']:.3f} / {scores['names_target']:.0%}" if scores else "-"


def _report(work: Path, rows: dict, concepts: dict, matrix: dict, means: dict, how: dict) -> str:
    models = list(rows)
    settings = {"per model": "each model's own defaults (per model)",
                "shared": f"shared: {how['settings_from']}'s settings for every model (--same-settings)"}
    header = [paragraph(f"Settings: {settings.get(how['settings'], how['settings'])}. "
                        f"Concepts: {len(concepts)}" + (f" from {how['prompts']}" if how.get("prompts") else "")
                        + (f". Inverted by {how['processes']} processes." if how["processes"] > 1 else "."))]
    summary = []
    for model, r in rows.items():
        if "error" in r and not r.get("summaries"):
            summary.append([model, span(r["error"], "error"), "", "", ""])
            continue
        done = r.get("summaries", {})
        p = sum(s["p_answer"] for s in done.values()) / max(len(done), 1)
        ms = sum(s["ms_per_step"] for s in done.values()) / max(len(done), 1)
        peaks = [s["peak_gib"] for s in done.values() if s["peak_gib"] is not None]
        notes = r["notes"] + ([f"failed: {r['error']}"] if "error" in r else []) + (
            [f"scoring failed: {r['scoring_error']}"] if "scoring_error" in r else [])
        shown = ", ".join(f"{k} {v}" for k, v in r.get("settings", {}).items() if v is not None)
        summary.append([model, f"{len(done)}/{len(concepts)}", f"{p:.3f}", f"{ms:.0f} ms",
                        f"{max(peaks):.1f} GiB" if peaks else "- (CPU)", f"{shown} {'; '.join(notes)}"])
    parts = [heading("mimic compare"), *header, image((work / "grid.png").read_bytes(), alt="grid"),
             heading("Per model", 2),
             table(["model", "concepts", "mean P(target)", "time per step", "peak memory", "settings, notes"], summary),
             heading("Transfer, mean over concepts: P(target) / greedy answer names the target", 2),
             table(["", *(f"scored by {m}" for m in models)],
                   [[f"inverted by {s}", *(_cell(means.get((s, j))) for j in models)] for s in models],
                   row_headers=True)]
    verified = [m for m in models if "verifier" in rows[m]]
    if verified:
        names = list(rows[verified[0]]["verifier"])
        parts += [heading("Verifier accuracy (an independent judge of the concepts)", 2),
                  table(["model", *names], [[m, *(f"{rows[m]['verifier'].get(n, 0):.2f}" for n in names)]
                                            for m in verified])]
    if len(concepts) > 1:
        parts.append(heading("Transfer per concept", 2))
        for key, concept in concepts.items():
            parts += [heading(f"{key}: {concept.class_name}", 3),
                      table(["", *(f"scored by {m}" for m in models)],
                            [[f"inverted by {s}", *(_cell(matrix.get((key, s, j))) for j in models)] for s in models],
                            row_headers=True)]
    return page("mimic compare", *parts)
