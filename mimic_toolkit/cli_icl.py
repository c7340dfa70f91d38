"""`mimic icl train|eval|apply`: learned in-context shift modules (MimIC, LIVE) on the command line.
Each command is a thin layer over `mimic_toolkit.icl`."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer

from .errors import UserError

icl_app = typer.Typer(no_args_is_help=True, help="Learned in-context shift modules (MimIC, LIVE): train, evaluate, apply.")

MODEL = typer.Option(None, "--model", "-m", help="Adapter id (default: the module's own, else the bundled toy).")
DATASET = typer.Option(..., help="JSON lines of {image, question, answer, id?, labels?}, paths relative to the file.")
DEMONSTRATIONS = typer.Option("images", help="images: every demonstration turn carries its image; text: only the "
                              "query turn does (toy-shapes-icl learned from text demonstrations).")
SPLIT_SEED = typer.Option(0, help="Seed of the split into demonstrations, training and held-out queries.")
N_DEMOS = typer.Option(32, "--demonstrations-pool", help="Entries set aside as demonstrations.")
HELD_OUT = typer.Option(300, help="Entries held out for evaluation.")
SIDE = typer.Option(None, help="Other questions (same format) whose answers the module should not change.")
DEVICE = typer.Option("auto", help="auto | cpu | cuda | cuda:N")
DTYPE = typer.Option("auto", help="auto | float32 | bfloat16 | float16")
ALLOW_OUTSIDE = typer.Option(False, "--allow-outside", help="Let --dataset name images outside its folder.")


def _load(model: Optional[str], checkpoint: Optional[str], revision: Optional[str], device: str, dtype: str):
    from .cli_lm import _load as load

    return load(model, checkpoint, revision, device, dtype)


def _meta_base(model_id: str, source: str, adapter, dataset: Path, split, demonstrations: str) -> dict:
    from .features import adapter_revision
    from .icl import FORMAT, dataset_hash, lm_shape, versions

    return {"format": FORMAT, "model": model_id, "checkpoint": source, "revision": adapter_revision(adapter),
            "shape": lm_shape(adapter), "dataset": str(dataset), "dataset_hash": dataset_hash(dataset),
            "demonstrations": demonstrations,
            "split": {"seed": split.seed, "sizes": split.sizes(), "ids": split.ids()}, "versions": versions()}


def _check_choice(value: str, choices, option: str) -> None:
    if value not in choices:
        raise UserError(f"{option} must be {' or '.join(choices)}, not '{value}'")


@icl_app.command("train")
def train_command(
    dataset: Path = DATASET, method: str = typer.Option("mimic", help="mimic | live"),
    shots: int = typer.Option(1, help="Demonstrations the teacher reads."),
    out: Path = typer.Option(..., help="Module folder to write."),
    model: Optional[str] = MODEL, checkpoint: Optional[str] = typer.Option(None), revision: Optional[str] = typer.Option(None),
    demonstrations: str = DEMONSTRATIONS, split_seed: int = SPLIT_SEED, demonstrations_pool: int = N_DEMOS,
    held_out: int = HELD_OUT, side: Optional[Path] = SIDE,
    # defaults that work on toy-shapes-icl; the paper's lr 5e-3 for one pass learned nothing there (RESULTS.md)
    steps: int = typer.Option(200, help="Training steps (the defaults are ones that work on toy-shapes-icl)."),
    batch_size: int = typer.Option(16), lr: float = typer.Option(1e-2, help="AdamW learning rate (cosine, warm-up)."),
    warmup: float = typer.Option(0.1, help="Share of the steps for the linear warm-up."),
    ce_weight: float = typer.Option(0.5, help="Weight of the answer CE (0: MimIC's alignment loss alone)."),
    seed: int = typer.Option(0, help="torch seed."), device: str = DEVICE, dtype: str = DTYPE,
    allow_outside: bool = ALLOW_OUTSIDE,
):
    """Train a MimIC or LIVE module so that the zero-shot model behaves as if it read --shots
    demonstrations; writes module.safetensors, meta.json, metrics.jsonl and report.html."""
    import torch

    from . import icl
    from .atomic import refuse_existing

    _check_choice(method, icl.METHODS, "--method")
    _check_choice(demonstrations, icl.DEMONSTRATIONS, "--demonstrations")
    refuse_existing(out, "--out")
    samples = icl.load_dataset(dataset, allow_outside)
    split = icl.split_dataset(samples, split_seed, demonstrations_pool, held_out)
    side_samples = icl.load_dataset(side, allow_outside) if side else None
    icl.check_recipe(split, shots=shots, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, ce_weight=ce_weight)
    model_id, source, adapter = _load(model, checkpoint, revision, device, dtype)
    torch.manual_seed(seed)
    module, history, seconds = icl.train(adapter, split, method, shots=shots, demonstrations=demonstrations,
                                         steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                                         ce_weight=ce_weight, log=typer.echo)
    evaluation = icl.compare(adapter, module, split, shots, demonstrations, side=side_samples)
    meta = {**_meta_base(model_id, source, adapter, dataset, split, demonstrations), "method": method, "shots": shots,
            "layers": list(range(module.shape["layers"])), "heads": module.shape["heads"],
            "recipe": {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup, "ce_weight": ce_weight,
                       "seed": seed, "optimizer": "AdamW, linear warm-up, cosine"},
            "parameters": icl.parameter_count(module), "training_seconds": round(seconds, 1)}
    description = icl.describe(adapter, module)
    folder = icl.write_folder(out, meta=meta, module=module,
                              metrics=history + [{"kind": "evaluation", **evaluation}, {"kind": "module", "rows": description}],
                              report=icl.report_html(meta, evaluation, None, description))
    _echo_evaluation(evaluation)
    typer.echo(f"-> {folder}")


def _echo_evaluation(evaluation: dict) -> None:
    acc, kl = evaluation["accuracy"], evaluation["kl_to_teacher"]
    typer.echo(f"accuracy: zero-shot {acc['zero_shot']:.3f}  {evaluation['shots']}-shot teacher {acc['teacher']:.3f}  "
               f"zero-shot + module {acc['module']:.3f}")
    typer.echo(f"KL(teacher || .) at the answer: zero-shot {kl['zero_shot']:.4f}  module {kl['module']:.4f}")
    gap = evaluation["mlp_distance"]["gap_closed"]
    typer.echo("MLP-output distance gap closed per layer: " + "  ".join(f"{g:+.1%}" for g in gap))
    if "side_effects" in evaluation:
        side = evaluation["side_effects"]
        typer.echo(f"side effects: accuracy {side['accuracy_without']:.3f} -> {side['accuracy_with']:.3f}, "
                   f"answers changed {side['changed']:.3f}")


@icl_app.command("eval")
def eval_command(
    dataset: Path = DATASET, out: Path = typer.Option(..., help="Folder to write."),
    module: Optional[Path] = typer.Option(None, help="A module folder: evaluate zero-shot + module against its teacher."),
    shots: str = typer.Option("0,1,2", help="Without --module: the shot counts to evaluate; with one: 0 (the student)."),
    model: Optional[str] = MODEL, checkpoint: Optional[str] = typer.Option(None), revision: Optional[str] = typer.Option(None),
    demonstrations: str = DEMONSTRATIONS, split_seed: int = SPLIT_SEED, demonstrations_pool: int = N_DEMOS,
    held_out: int = HELD_OUT, side: Optional[Path] = SIDE,
    baseline: Optional[str] = typer.Option(None, help="mean-difference: the steering-vector baseline against the "
                                           "--shots teacher (the mean teacher - zero-shot state of --layer at the "
                                           "position that predicts the answer, added at every position)."),
    layer: int = typer.Option(-1, help="The baseline's layer (negative: from the end)."),
    alpha: float = typer.Option(1.0, help="The baseline's scale."),
    device: str = DEVICE, dtype: str = DTYPE, allow_outside: bool = ALLOW_OUTSIDE,
):
    """Held-out accuracy per shot count, or (--module) a module against the teacher it mimics, or
    (--baseline) a steering vector against it: writes meta.json, metrics.jsonl and report.html."""
    from . import icl
    from .atomic import refuse_existing

    try:
        counts = sorted({int(k) for k in shots.split(",")})
    except ValueError:
        raise UserError(f"--shots must be comma-separated whole numbers, not '{shots}'") from None
    if any(k < 0 for k in counts):
        raise UserError("--shots must be at least 0")
    refuse_existing(out, "--out")
    samples = icl.load_dataset(dataset, allow_outside)
    if baseline is not None:
        _check_choice(baseline, ("mean-difference",), "--baseline")
        _check_choice(demonstrations, icl.DEMONSTRATIONS, "--demonstrations")
        if module is not None or len(counts) != 1 or counts[0] < 1:
            raise UserError("--baseline takes one teacher shot count of at least 1 (--shots K) and no --module")
        split = icl.split_dataset(samples, split_seed, demonstrations_pool, held_out)
        model_id, source, adapter = _load(model, checkpoint, revision, device, dtype)
        if not math.isfinite(alpha):
            raise UserError(f"--alpha must be a finite number, not {alpha}")
        vector = icl.mean_difference(adapter, split, counts[0], demonstrations, layer, alpha=alpha)
        evaluation = icl.compare(adapter, vector, split, counts[0], demonstrations,
                                 side=icl.load_dataset(side, allow_outside) if side else None)
        description = icl.describe(adapter, vector)
        meta = {**_meta_base(model_id, source, adapter, dataset, split, demonstrations), "method": baseline,
                "shots": counts[0], "layer": vector.layer, "alpha": alpha, "parameters": vector.vector.numel()}
        icl.write_folder(out, meta=meta, metrics=[{"kind": "evaluation", **evaluation}, {"kind": "module", "rows": description}],
                         report=icl.report_html(meta, evaluation, None, description))
        _echo_evaluation(evaluation)
        typer.echo(f"-> {out}")
        return
    if module is None:
        _check_choice(demonstrations, icl.DEMONSTRATIONS, "--demonstrations")
        split = icl.split_dataset(samples, split_seed, demonstrations_pool, held_out)
        model_id, source, adapter = _load(model, checkpoint, revision, device, dtype)
        accuracy = icl.shot_accuracy(adapter, split, counts, demonstrations)
        meta = {**_meta_base(model_id, source, adapter, dataset, split, demonstrations), "shots": counts}
        icl.write_folder(out, meta=meta, metrics=[{"kind": "shots", "shots": k, "accuracy": a} for k, a in accuracy.items()],
                         report=icl.report_html(meta, None, accuracy, None))
        typer.echo("held-out accuracy: " + "  ".join(f"{k}-shot {a:.3f}" for k, a in accuracy.items()) + f" -> {out}")
        return
    if counts != [0]:
        raise UserError("with --module, --shots is 0: the module is evaluated zero-shot against its teacher")
    trained = icl.read_meta(module)
    model_id, source, adapter = _load(model or trained["model"], checkpoint or trained["checkpoint"],
                                      revision or trained.get("revision") or None, device, dtype)
    loaded, trained = icl.load_module(module, adapter, model_id)
    split = icl.split_from_meta(samples, trained)
    side_samples = icl.load_dataset(side, allow_outside) if side else None
    evaluation = icl.compare(adapter, loaded, split, trained["shots"], trained["demonstrations"], side=side_samples)
    description = icl.describe(adapter, loaded)
    meta = {**trained, "evaluated_on": str(dataset), "evaluated_dataset_hash": icl.dataset_hash(dataset)}
    icl.write_folder(out, meta=meta, metrics=[{"kind": "evaluation", **evaluation}, {"kind": "module", "rows": description}],
                     report=icl.report_html(meta, evaluation, None, description))
    _echo_evaluation(evaluation)
    typer.echo(f"-> {out}")


@icl_app.command("apply")
def apply_command(
    module: Path = typer.Option(..., help="A module folder from `mimic icl train`."),
    images: Path = typer.Option(..., help="Folder of images (searched recursively)."),
    question: str = typer.Option(..., help="The question for every image."),
    out: Path = typer.Option(..., help="JSON lines to write: id, image, question, answer, answer_without_module."),
    max_new_tokens: int = typer.Option(16, min=1), batch_size: int = typer.Option(8, min=1),
    model: Optional[str] = MODEL, checkpoint: Optional[str] = typer.Option(None), device: str = DEVICE, dtype: str = DTYPE,
):
    """Answer zero-shot with the module on (greedy), beside the answer without it."""
    import torch

    from . import icl
    from .atomic import refuse_existing, write_file
    from .engine import format_prompt
    from .features import open_rgb
    from .lm_capture import load_samples, until_end

    refuse_existing(out, "--out")
    trained = icl.read_meta(module)
    samples = load_samples(images=images, question=question)
    model_id, _, adapter = _load(model or trained["model"], checkpoint or trained["checkpoint"], trained.get("revision") or None,
                                 device, dtype)
    loaded, _ = icl.load_module(module, adapter, model_id)
    prompt = format_prompt(adapter, [(question, "")], target=False)
    lines = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = samples[start:start + batch_size]
            pixels = adapter.preprocess([open_rgb(s.image) for s in batch])
            plain = adapter.generate(pixels, prompt, max_new_tokens).tolist()
            with loaded.applied(adapter):
                shifted = adapter.generate(pixels, prompt, max_new_tokens).tolist()
            decode = lambda ids: adapter.tokenizer.decode(until_end(adapter, ids), skip_special_tokens=True).strip()
            lines += [json.dumps({"id": s.id, "image": str(s.image), "question": question, "answer": decode(a),
                                  "answer_without_module": decode(b)}) for s, a, b in zip(batch, shifted, plain)]
    write_file(out, "".join(line + "\n" for line in lines), new="--out")
    typer.echo(f"{len(lines)} answers -> {out}")


def add_commands(app: typer.Typer) -> None:
    app.add_typer(icl_app, name="icl")
