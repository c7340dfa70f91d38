"""`mimic capture`, `mimic concepts`, `mimic steer`, `mimic shift`: the language-model side of the
toolkit on the command line. Each command is a thin layer over a library function."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer

from .atomic import refuse_existing, write_file
from .errors import UserError

concepts_app = typer.Typer(no_args_is_help=True, help="Concept dictionaries of captured hidden states.")
steer_app = typer.Typer(no_args_is_help=True, help="Steering vectors: build one, answer with it.")

MODEL = typer.Option(None, "--model", "-m", help="Adapter id (`mimic models`; default: the bundled toy model).")
CHECKPOINT = typer.Option(None, help="Local checkpoint folder or hub id.")
DEVICE = typer.Option("auto", help="auto | cpu | cuda | cuda:N")
DTYPE = typer.Option("auto", help="auto | float32 | bfloat16 | float16")
IMAGES = typer.Option(None, help="Folder of images (searched recursively).")
DATASET = typer.Option(None, help="JSON lines of {image, question?, id?, labels?}, paths relative to the file.")
QUESTION = typer.Option(None, help="The question for every image (default: 'Describe the image.').")
ALLOW_OUTSIDE = typer.Option(False, "--allow-outside", help="Let --dataset name images outside the dataset file's folder.")


def _load(model: Optional[str], checkpoint: Optional[str], revision: Optional[str], device: str, dtype: str):
    """(adapter id, checkpoint as recorded, adapter)."""
    from .engine import load_model

    adapter = load_model(model, checkpoint=checkpoint, revision=revision, device=device, dtype=dtype)
    local = Path(adapter.checkpoint).expanduser()
    return adapter.model_id, str(local.resolve()) if local.exists() else adapter.checkpoint, adapter


def _model_id(model: Optional[str]) -> str:
    """The id `--model` names (default: the bundled toy model's), without loading it."""
    from .registry import default_registry

    registry = default_registry()
    return (registry.adapter_spec(model) if model else registry.default_model()).id


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in ".-" else "-" for ch in text)[:40]


def capture(
    model: Optional[str] = MODEL, checkpoint: Optional[str] = CHECKPOINT, revision: Optional[str] = typer.Option(None),
    images: Optional[Path] = IMAGES, dataset: Optional[Path] = DATASET, question: Optional[str] = QUESTION,
    site: str = typer.Option(..., help="LM site: lm.I (residual after layer I), lm.I.attn, lm.I.mlp, lm.final_norm."),
    tokens: str = typer.Option(..., help="all | image | prompt | last-prompt | generated | word:WORD[,WORD...]"),
    word_position: str = typer.Option("predict", help="word: the position that predicts the word, or its own last token (own)."),
    generate: bool = typer.Option(False, "--generate", help="Generate and index the answers for any selector."),
    max_new_tokens: int = typer.Option(16, min=1, help="Longest generated answer."),
    batch_size: int = typer.Option(8, min=1), out: Optional[Path] = typer.Option(None, help="Features folder to write."),
    allow_outside: bool = ALLOW_OUTSIDE, device: str = DEVICE, dtype: str = DTYPE,
):
    """Store the hidden states of one LM site at the selected token positions (safetensors + index)."""
    from .lm_capture import Selector, capture as run_capture, load_samples

    selector = Selector.parse(tokens)
    samples = load_samples(images, dataset, question, allow_outside)
    out = out or Path("features") / _slug(f"{_model_id(model)}-{site}-{tokens}")
    refuse_existing(out, "--out")  # before the model loads
    model_id, source, adapter = _load(model, checkpoint, revision, device, dtype)
    folder = run_capture(adapter, model_id, samples, site, selector, out, checkpoint=source, batch_size=batch_size,
                         max_new_tokens=max_new_tokens, word_position=word_position, generate=generate)
    meta = json.loads((folder / "meta.json").read_text())
    typer.echo(f"{meta['samples']} samples, {meta['rows']} rows of width {meta['hidden_size']} "
               f"({len(meta['skipped'])} skipped, reasons in meta.json) -> {folder}")


@concepts_app.command("fit")
def concepts_fit(
    features: Path = typer.Option(..., help="Features folder from `mimic capture`."),
    method: str = typer.Option("snmf", help="snmf | kmeans | pca | simple"),
    k: int = typer.Option(20, "--k", min=1, help="Number of concepts."),
    out: Optional[Path] = typer.Option(None, help="Concepts folder to write (default concepts/<features>-<method>-<k>)."),
    seed: int = typer.Option(0), sparsity: float = typer.Option(0.1, help="snmf: L1 weight on the codes, x mean row norm."),
    words: int = typer.Option(10, min=1, help="Grounded words per concept."),
    images: int = typer.Option(6, min=1, help="Top-activating images per concept."),
    checkpoint: Optional[str] = typer.Option(None, help="The model to unembed with (default: the features' own)."),
    no_words: bool = typer.Option(False, "--no-words", help="Ground in images only (the model is not loaded)."),
    final_norm: Optional[bool] = typer.Option(None, "--final-norm/--no-final-norm",
                                              help="Apply the final norm before unembedding (default: unless the site is lm.final_norm)."),
    device: str = DEVICE,
):
    """Decompose captured hidden states into K concepts, grounded in words and images; writes report.html."""
    from .lm_capture import Features
    from .concepts import fit_concepts

    data = Features.load(features)
    out = out or Path("concepts") / _slug(f"{features.name}-{method}-{k}")
    refuse_existing(out, "--out")  # before the model loads
    adapter = None
    if not no_words:
        adapter = _load(data.model, checkpoint or data.meta["checkpoint"], data.meta.get("revision") or None,
                        device, "float32")[2]
    folder = fit_concepts(data, method, k, out, adapter=adapter, seed=seed, sparsity=sparsity, words=words,
                          images=images, apply_final_norm=final_norm)
    summary = json.loads((folder / "concepts.json").read_text())
    metrics = summary["meta"]["metrics"]
    for card in summary["concepts"]:
        typer.echo(f"concept {card['concept']:>2} ({card['samples']} samples): {', '.join(card['words'][:6])}")
    purity = ", ".join(f"{key} {value:.3f}" for key, value in metrics["purity"].items())
    typer.echo(f"word overlap {metrics['word_overlap']}" + (f"; purity: {purity}" if purity else ""))
    typer.echo(f"concepts: {folder}\nreport:   {folder / 'report.html'}")


@concepts_app.command("project")
def concepts_project(
    concepts: Path = typer.Option(..., help="Concepts folder (or its concepts.safetensors)."),
    features: Path = typer.Option(..., help="Features of the new samples, captured like the fitted ones."),
    top: int = typer.Option(3, min=1, help="Concepts listed per sample."),
    out: Optional[Path] = typer.Option(None, help="Write every sample's activations as JSON lines."),
):
    """The concepts of new samples."""
    from .lm_capture import Features
    from .concepts import ConceptSet, project

    if out:
        refuse_existing(out, "--out")
    rows = project(ConceptSet.load(concepts), Features.load(features), top)
    if out:
        write_file(out, "".join(json.dumps(row) + "\n" for row in rows), new="--out")
    for row in rows:
        listed = "; ".join(f"{t['concept']} ({t['activation']:.3g}: {' '.join(t['words'][:3])})" for t in row["top"])
        typer.echo(f"{row['id']}: {listed}")


@steer_app.command("build")
def steer_build(
    base: Path = typer.Option(..., help="Features of the behaviour to move away from."),
    target: Path = typer.Option(..., help="Features of the behaviour to move towards."),
    out: Path = typer.Option(..., help="Vector file to write (.safetensors)."),
):
    """v = mean(target) - mean(base) at the features' site."""
    from .lm_capture import Features
    from .steer import build_vector, save_vector

    refuse_existing(out, "--out")
    vector, meta = build_vector(Features.load(base), Features.load(target))
    save_vector(vector, meta, out)
    typer.echo(f"vector at {meta['site']}, norm {meta['norm']:.4g} ({meta['base_samples']} base, "
               f"{meta['target_samples']} target samples) -> {out}")


@steer_app.command("apply")
def steer_apply(
    model: Optional[str] = MODEL, checkpoint: Optional[str] = CHECKPOINT, revision: Optional[str] = typer.Option(None),
    vector: Path = typer.Option(..., help="Vector file from `mimic steer build`."),
    site: Optional[str] = typer.Option(None, help="LM site to steer (default: the vector's own)."),
    alpha: float = typer.Option(1.0, help="Multiple of the vector added."),
    positions: str = typer.Option("all", help="all | generated | last-prompt | from:N"),
    images: Optional[Path] = IMAGES, dataset: Optional[Path] = DATASET, question: Optional[str] = QUESTION,
    max_new_tokens: int = typer.Option(16, min=1), batch_size: int = typer.Option(8, min=1),
    out: Optional[Path] = typer.Option(None, help="Write every answer before/after as JSON lines."),
    allow_outside: bool = ALLOW_OUTSIDE, device: str = DEVICE, dtype: str = DTYPE,
):
    """Answer with and without the steering vector; show the answers side by side."""
    from .lm_capture import load_samples
    from .lm import PositionPolicy
    from .lm_objective import check_model
    from .steer import load_vector, steer_answers

    if not math.isfinite(alpha):  # NaN or inf would steer every answer into garbage
        raise UserError(f"--alpha must be a finite number, not {alpha}")
    policy = PositionPolicy.parse(positions)
    if out:
        refuse_existing(out, "--out")  # before the model loads and every answer is generated
    direction, meta = load_vector(vector)
    samples = load_samples(images, dataset, question, allow_outside)
    model_id, _, adapter = _load(model, checkpoint, revision, device, dtype)
    check_model(meta, model_id, str(vector))
    rows = steer_answers(adapter, samples, site or meta["site"], direction, alpha, policy,
                         max_new_tokens=max_new_tokens, batch_size=batch_size)
    if out:
        write_file(out, "".join(json.dumps(row) + "\n" for row in rows), new="--out")
    from rich.console import Console
    from rich.table import Table

    table = Table("sample", "question", "before", "after")
    for row in rows:
        after = row["after"] if row["after"] == row["before"] else f"[bold]{row['after']}[/bold]"
        table.add_row(row["id"], row["question"], row["before"], after)
    Console().print(table)
    changed = sum(row["before"] != row["after"] for row in rows)
    typer.echo(f"{changed} of {len(rows)} answers changed (site {site or meta['site']}, alpha {alpha}, positions {policy})")


def shift(
    original: Path = typer.Option(..., help="Features of the original model."),
    finetuned: Path = typer.Option(..., help="Features of the fine-tuned model on the same samples."),
    method: str = typer.Option("kmeans", help="snmf | kmeans | pca | simple"),
    k: int = typer.Option(20, "--k", min=1), alpha: float = typer.Option(1.0, help="shifted concept = concept + alpha * shift"),
    seed: int = typer.Option(0), top: int = typer.Option(10, min=1, help="Top samples compared per concept."),
    no_words: bool = typer.Option(False, "--no-words", help="Skip the word comparison (the model is not loaded)."),
    checkpoint: Optional[str] = typer.Option(None, help="The fine-tuned model (default: its features' own)."),
    out: Optional[Path] = typer.Option(None, help="Write the full result as JSON."),
    device: str = DEVICE,
):
    """Per-concept shift vectors between an original and a fine-tuned model, matched to the fine-tuned concepts."""
    from .lm_capture import Features
    from .shift import shift_analysis

    if out:
        refuse_existing(out, "--out")
    before, after = Features.load(original), Features.load(finetuned)
    adapter = _load(after.model, checkpoint or after.meta["checkpoint"], after.meta.get("revision") or None,
                    device, "float32")[2] if not no_words else None
    result = shift_analysis(before, after, method=method, k=k, alpha=alpha, seed=seed, top=top, adapter=adapter)
    if out:
        write_file(out, json.dumps(result, indent=2), new="--out")
    for row in result["concepts"]:
        typer.echo(f"concept {row['concept']:>2} -> {row['match']:>2}: cosine {row['cosine_original']:.3f} -> "
                   f"{row['cosine_shifted']:.3f}, top-{top} overlap {row['top_overlap_original']:.2f} -> "
                   f"{row['top_overlap_shifted']:.2f}")
    s = result["summary"]
    typer.echo(f"mean cosine to the fine-tuned match: original {s['cosine_original']:.3f}, shifted "
               f"{s['cosine_shifted']:.3f}; distance improvement {s['distance_improvement']:.4g}")


def add_commands(app: typer.Typer) -> None:
    app.command()(capture)
    app.add_typer(concepts_app, name="concepts")
    app.add_typer(steer_app, name="steer")
    app.command()(shift)

