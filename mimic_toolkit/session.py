"""Turns settings into a finished run folder: resolves the config, checks every input before any
work starts, loads the model, runs the inversion with checkpoints, writes images and the report."""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable

from .config import InversionConfig, normalise_keys, read_config_file, resolve
from .adapter import checkpoint_source
from .engine import format_prompt, load_model, meta_adapter, resolve_device, vision_sites
from .errors import UserError
from .features import FeatureStats
from .guides import check_guide
from .inversion import build_inversion
from .lm_objective import parse_objective
from .prompts import IMAGENET_PROMPTS, direct, load_prompts, select
from .registry import Registry
from .runfolder import RunFolder, manifest
from .specs import AdapterSpec, terms_on, terms_reading
from .transforms import from_settings, largest_shift

# Settings that may differ when a run is resumed (they do not change the result).
RESUME_MAY_CHANGE = {"device", "outputs", "compile", "memory_saving",  # where and how, not what
                     "log_every", "grid_every", "checkpoint_every"}


class Interrupted(Exception):
    """Ctrl-C: a checkpoint was saved; the run can be resumed."""

    def __init__(self, run: RunFolder, step: int):
        super().__init__(f"interrupted at step {step}; checkpoint saved. Continue with: "
                         f"mimic invert --resume {run.path}")


def build_config(registry: Registry, flags: dict, config_file: str | None = None,
                 resume: str | None = None) -> InversionConfig:
    """defaults < the model's defaults < config file < flags; with `resume`, the run's own config,
    and any setting given again must agree with it."""
    file_layer = read_config_file(config_file) if config_file else {}
    given = absolute_inputs({**file_layer, **{k: v for k, v in flags.items() if v is not None}})
    if "scales" in file_layer and "scales" in given:
        given["scales"] = {**file_layer["scales"], **given["scales"]}  # scales merge per term
    if resume:
        stored = normalise_keys(RunFolder.for_resume(resume).read_config(), f"run '{resume}'")
        check_same_settings(stored, given, f"--resume: run '{resume}'")
        config = resolve([stored, {k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}])
        config.validate(registry.objective_specs())  # the stored file may have been edited
        return config
    spec = registry.adapter_spec(given["model"]) if given.get("model") else registry.default_model()
    terms = registry.objective_specs()
    term_layer = {"scales": {name: t.default_scale for name, t in terms.items()}}
    model_layer = normalise_keys(spec.defaults, f"defaults of adapter '{spec.id}'")
    # an LM objective replaces the answer: the terms that read it on, the answer's off, unless set
    objective_layer = {"scales": {**{t: 0.0 for t in terms_reading(terms, "answer")},
                                  **{t: 1.0 for t in terms_reading(terms, "lm_objective")}}} \
        if given.get("objective") else {}
    config = resolve([term_layer, model_layer, objective_layer, given])
    if {"jitter", "flip"} & set(given) and "transforms" not in given:
        config.transforms = None  # the classic shift-and-flip asked for wins over a model's default --transforms
    config.model = spec.id
    config.validate(terms)
    return config


def check_same_settings(stored: dict, given: dict, run: str) -> None:
    """A run continued (or a sweep's class reused) must have been made with the settings given
    now, the where-and-how settings aside; else one line naming the first that differs."""
    for key, value in given.items():
        if value is not None and key not in RESUME_MAY_CHANGE and key in stored and stored[key] != value and not (
                key == "scales" and all(stored["scales"].get(t) == s for t, s in value.items())):
            raise UserError(f"{run} was made with {key}={stored[key]!r}, not {value!r}; start a new run to change it")


def absolute_inputs(settings: dict) -> dict:
    """Input paths made absolute, so a run's config.yaml works as `--config` from any folder."""
    paths = {"prompts", "stats", "guide_weights"} | ({"checkpoint"} if settings.get("checkpoint") and
                                    Path(settings["checkpoint"]).expanduser().exists() else set())
    return {k: str(Path(v).expanduser().resolve()) if k in paths and v else v for k, v in settings.items()}


def load_configured(registry: Registry, config: InversionConfig, device: str | None = None):
    """The model a run's settings name, loaded through `load_model` (on `device`, else the config's)."""
    return load_model(config.model, checkpoint=config.checkpoint, device=device or config.device, dtype=config.dtype,
                      device_map=config.device_map, revision=config.revision,
                      trust_remote_code=config.trust_remote_code, registry=registry)


def concept_of(config: InversionConfig, spec: AdapterSpec):
    """The concept a run inverts. A direct question whose answer is one of the prompt file's
    concepts (the same words, any case) is that concept asked another way: it keeps the concept's
    class index, so a statistics folder gives its statistics."""
    source = config.prompts or spec.prompts or str(IMAGENET_PROMPTS)
    if config.question is None:
        return select(load_prompts(source), config.class_index, f"prompt file '{source}'")
    asked = direct(config.question, config.answer)
    known = load_prompts(source) if config.prompts or Path(source).is_file() else []
    same = [c for c in known if c.target.strip().casefold() == asked.target.strip().casefold()]
    return replace(asked, class_index=same[0].class_index, class_name=same[0].class_name) if same else asked


class Processes:
    """This process's place in a multi-process run (`accelerate launch`), or a single process."""

    def __init__(self, device_option: str):
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            self.state = PartialState(cpu=device_option == "cpu")
            self.rank, self.world_size, self.device = (self.state.process_index, self.state.num_processes,
                                                       str(self.state.device))
        else:
            self.rank, self.world_size = 0, 1
            self.device = resolve_device(device_option)

    def wait(self):
        if self.state:
            self.state.wait_for_everyone()

    def share(self, value):
        """rank 0's value, on every rank."""
        if not self.state:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]


def run_inversion(registry: Registry, config: InversionConfig, *, resume: str | None = None,
                  progress: Callable[[dict], None] | None = None,
                  stop_requested: Callable[[], bool] = lambda: False, adapter=None) -> Path:
    """Run (or resume) one inversion; returns the completed run folder. Pass `adapter` to reuse
    a loaded model (a sweep loads it once for all its classes)."""
    spec = registry.adapter_spec(config.model)
    concept, stats = check_inputs(config, spec, needs_checkpoint=adapter is None, terms=registry.objective_specs(),
                                  registry=registry)
    procs = Processes(config.device)
    run = _run_folder(config, spec, concept, procs, resume)
    try:
        adapter = adapter or load_configured(registry, config, procs.device)
        _use_resolution(adapter, config, spec)
        prompt = format_prompt(adapter, concept.chat_sequence)
        if stats is not None:
            stats.check_matches(adapter, spec.id, config.resolution, config.stats or spec.stats or "",
                                sites=vision_sites(adapter, config.feature_sites))
        lm_objective = parse_objective(config.objective, adapter, spec.id, prompt, config.objective_positions) \
            if config.objective else None
        inversion = build_inversion(registry, adapter, prompt, config, stats, rank=procs.rank, lm_objective=lm_objective)
        if procs.rank == 0 and not resume:
            run.create()  # before the try: a folder that was there already is never removed
        try:
            info = _restore(inversion, run) if resume else _start(run, config, adapter, concept, procs,
                                                                  stats and stats.record(), inversion.targets.tolist(),
                                                                  inversion.guide and inversion.guide.record())
            first_step, started = inversion.step, time.perf_counter()
            _optimise(inversion, run, config, adapter, progress if procs.rank == 0 else None, stop_requested,
                      procs.rank)
            return _finish(registry, run, inversion, adapter, concept, info, procs, config.iterations - first_step,
                           time.perf_counter() - started)
        except Exception:
            # a failure before the first checkpoint (a full disk, say) leaves nothing worth resuming
            if not run.checkpoint_path.exists() and procs.rank == 0:
                shutil.rmtree(run.path, ignore_errors=True)
            raise
        finally:
            inversion.close()
    finally:
        run.unlock()


def _run_folder(config: InversionConfig, spec: AdapterSpec, concept, procs: Processes, resume: str | None) -> RunFolder:
    """The run's folder; on rank 0, locked against a second process (released by `run_inversion`)."""
    if resume:
        return RunFolder.for_resume(resume, procs.rank, procs.world_size, lock=procs.rank == 0)
    default = Path("runs") / f"{spec.id}-{_slug(concept)}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = RunFolder(Path(procs.share(config.outputs or str(default))), procs.rank, procs.world_size)
    if procs.rank == 0:
        run.lock()
        if run.final.exists() or run.path.exists():
            try:
                run.check_new()  # before the model is loaded
            except UserError:
                run.unlock()
                raise
    return run


def _use_resolution(adapter, config: InversionConfig, spec: AdapterSpec) -> None:
    config.resolution = config.resolution or adapter.resolution
    _check_shift(config, config.resolution, None)
    if config.resolution % adapter.patch_size:
        raise UserError(f"resolution {config.resolution} is not a multiple of the patch size "
                        f"{adapter.patch_size} of '{spec.id}'")
    adapter.use_resolution(config.resolution)


def _restore(inversion, run: RunFolder) -> dict:
    """A resumed run: its checkpoint's state, its metrics up to it, its manifest."""
    inversion.load_state_dict(run.load_checkpoint(inversion.state_layout()))
    run.truncate_metrics(inversion.step)
    return run.read_manifest()


def _start(run: RunFolder, config: InversionConfig, adapter, concept, procs: Processes,
           stats_record: dict | None, target_ids: list[int], guide_record: dict | None = None) -> dict:
    """A new run: its config and manifest, in the folder `run_inversion` created."""
    if procs.rank == 0:  # reusable as --config: the inputs, not this run's own folder
        run.write_config({k: v for k, v in config.to_dict().items() if k != "outputs"})
    procs.wait()
    info = manifest(config.to_dict(), adapter, procs.device, procs.world_size)
    info.update(concept={"class_index": concept.class_index, "class_name": concept.class_name,
                         "target": concept.target}, stats=stats_record, guide=guide_record,
                target_tokens=adapter.tokenizer.convert_ids_to_tokens(target_ids))
    if procs.rank == 0:
        run.write_manifest(info)
    return info


def _finish(registry: Registry, run: RunFolder, inversion, adapter, concept, info: dict, procs: Processes,
            steps_run: int, seconds: float) -> Path:
    """Images, the last checkpoint, timings, an independent judge's verdict (where a plugin has one
    for the concept) and the report; the folder gets its final name."""
    final_images = adapter.denormalise(inversion.images.detach())
    run.save_images(final_images)
    run.save_checkpoint(inversion.state_dict())
    procs.wait()
    if procs.rank != 0:
        return run.final
    info["timings"] = info.get("timings", []) + [{"steps": steps_run, "seconds": round(seconds, 3),
                                                  "ms_per_step": round(1000 * seconds / max(steps_run, 1), 2)}]
    info["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    verdict = registry.ask("mimic_verify_images", images=final_images.float().cpu(), concept=concept)
    if verdict:
        info["verdicts"] = {f"verifier: {name}": round(value, 4) for name, value in verdict.items()}
    run.write_manifest(info)
    from .report import write_report

    write_report(run.path)
    return run.finish()


def _optimise(inversion, run, config, adapter, progress, stop_requested, rank) -> None:
    """The loop: steps, with metrics, grids and checkpoints at their intervals."""
    started, first_step = time.perf_counter(), inversion.step
    targets = adapter.tokenizer.convert_ids_to_tokens(inversion.targets.tolist())
    while inversion.step < config.iterations:
        step = inversion.step + 1
        logging = step % config.log_every == 0 or step in (1, config.iterations)
        metrics = inversion.run_step(want_metrics=logging)
        stopping = stop_requested()
        if logging or stopping or step % config.checkpoint_every == 0:  # these steps sync anyway
            _stop_if_nonfinite(inversion, run, step)
        if metrics:
            metrics["elapsed_s"] = round(time.perf_counter() - started, 3)
            run.append_metrics(metrics)
            if progress:
                progress({**metrics, "iterations": config.iterations, "first_step": first_step,
                          "target_tokens": targets, "rank": rank})
        if step % config.grid_every == 0:
            run.save_grid(adapter.denormalise(inversion.images.detach()), step)
        if step % config.checkpoint_every == 0 or stopping:
            run.save_checkpoint(inversion.state_dict())
        if stopping and step < config.iterations:
            raise Interrupted(run, step)


def _stop_if_nonfinite(inversion, run, step: int) -> None:
    """Checked before a metrics line or a checkpoint is written, so neither ever holds NaN."""
    bad = inversion.nonfinite_terms()
    if bad:
        kept = f"the last finite checkpoint is kept in {run.path}" if run.checkpoint_path.exists() else \
            "no checkpoint was written yet"
        raise UserError(f"the loss became non-finite by step {step} (non-finite: {', '.join(bad)}); "
                        f"the run stopped and {kept}")


def check_inputs(config: InversionConfig, spec: AdapterSpec, needs_checkpoint: bool = True, terms: dict | None = None,
                 registry: Registry | None = None):
    """Every input a run reads, checked before any work: (the concept, the feature statistics or
    None); with `registry`, the guide network's weights too. What is missing or wrong is named all
    at once, in one error line, so a user fixes it in one go rather than one input per attempt."""
    problems = []

    def checked(read, *args):
        try:
            return read(*args)
        except UserError as exc:
            problems.append(str(exc))

    statistics_terms = active_statistics_terms(config, terms or _default_terms())
    concept = checked(concept_of, config, spec)
    stats = checked(_stats_for, config, spec, concept, statistics_terms) if concept else None
    _check_shift(config, config.resolution or spec.resolution, problems)
    if config.feature_sites and statistics_terms:
        checked(_check_sites, config, spec)
    if registry is not None:
        checked(check_guide, registry, config, terms or _default_terms())
    if needs_checkpoint:
        source = config.checkpoint or spec.checkpoint
        if source:
            checked(checkpoint_source, source)
        else:
            problems.append(f"model '{spec.id}' needs --checkpoint PATH (a local folder or a hub id)")
    if problems:
        raise UserError("; ".join(problems))
    return concept, stats


def _check_shift(config: InversionConfig, side: int | None, problems: list[str] | None) -> None:
    """A shift must be smaller than the image (a larger one moves it out of view): added to
    `problems`, or raised when there is no list to add to."""
    shift = largest_shift(from_settings(config.transforms, config.jitter, config.flip))
    if side and shift >= side:
        name = "the shift in --transforms" if config.transforms else "jitter"
        problem = f"{name} must be smaller than the image side {side}, not {shift}"
        if problems is None:
            raise UserError(problem)
        problems.append(problem)


def _check_sites(config: InversionConfig, spec: AdapterSpec) -> None:
    """--feature-sites against the model's architecture (its config; no weights are read). A hub id
    is not fetched for this: its sites are checked once it has loaded."""
    source = config.checkpoint or spec.checkpoint
    if source is None or Path(source).expanduser().is_dir():
        vision_sites(meta_adapter(spec.id, config.checkpoint)[1], config.feature_sites)


def active_statistics_terms(config: InversionConfig, terms: dict) -> list[str]:
    """The terms on in `config` that read feature statistics (they need --stats)."""
    return terms_on(terms, "vision_statistics", config.scales)


def _default_terms() -> dict:
    from .registry import default_registry

    return default_registry().objective_specs()


def _stats_for(config: InversionConfig, spec: AdapterSpec, concept, statistics_terms: list[str]) -> FeatureStats | None:
    """The statistics the active terms that read them match (None when no such term is on)."""
    if not statistics_terms:
        return None
    source = config.stats or spec.stats
    if not source:
        raise UserError(f"the feature-statistics term needs --stats FILE (make one with `mimic stats`), "
                        f"or turn it off with --scale {statistics_terms[0]}=0")
    if concept.class_index < 0 and Path(source).is_dir():
        # a folder holds statistics per concept, and this answer is none of them: the run is still
        # meaningful without those terms, and its config records them as off
        for term in statistics_terms:
            config.scales[term] = 0.0
        print(f"note: the answer '{concept.target}' is no concept of the prompt file, so the statistics folder "
              f"'{source}' has none for it; running without the feature-statistics term ({', '.join(statistics_terms)})",
              file=sys.stderr)
        return None
    return FeatureStats.find(source, spec.id, concept.class_index)


def _slug(concept) -> str:
    if concept.class_index >= 0:
        return f"c{concept.class_index}"
    return "".join(ch if ch.isalnum() else "-" for ch in concept.target.lower())[:24].strip("-") or "answer"


@contextmanager
def stop_on_ctrl_c():
    """The first Ctrl-C asks the loop to checkpoint and stop at the end of the step; a second one
    interrupts at once. Yields the `stop_requested` callable."""
    requested = []

    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(True)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no signal handling
        yield lambda: False
        return
    try:
        yield lambda: bool(requested)
    finally:
        signal.signal(signal.SIGINT, previous)
