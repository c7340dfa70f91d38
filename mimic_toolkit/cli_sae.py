"""`mimic sae train|eval|import|layers|features`: sparse autoencoders on a model's hidden states
(image tokens above all), layer by layer. Each command is a thin layer over a library function."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .cli_lm import ALLOW_OUTSIDE, CHECKPOINT, DATASET, DEVICE, DTYPE, MODEL, _load
from .errors import UserError

sae_app = typer.Typer(no_args_is_help=True, help="Sparse autoencoders on hidden states, layer by layer.")
TOKENS = typer.Option("image", "--tokens", help="image | prompt | answer | all: the rows of the features used.")


def _line(group: str, m: dict) -> str:
    return (f"{group:>9}: FVU {m['fvu']:.4f} (explained {m['explained_variance']:.4f}), cosine {m['cosine']:.4f}, "
            f"L0 {m['l0']:.2f} ({100 * m['active_fraction']:.2f} %), dead {m['dead']} "
            f"({100 * m['dead_fraction']:.1f} %), dense {m['dense']}, {m['rows']} rows")


@sae_app.command("train")
def train(
    features: Path = typer.Option(..., help="Features folder from `mimic capture` (read shard by shard)."),
    tokens: str = TOKENS,
    arch: str = typer.Option("topk", "--arch", help="topk | relu (jumprelu SAEs are imported, not trained)."),
    k: int = typer.Option(16, "--k", min=1, help="topk: active latents per row."),
    width: float = typer.Option(4.0, help="Latents as a multiple of the input width."),
    steps: int = typer.Option(2000, min=1), batch_size: int = typer.Option(256, min=1),
    lr: float = typer.Option(1e-3), l1: float = typer.Option(1.0, help="relu: L1 weight (decoder-norm weighted)."),
    aux: float = typer.Option(1 / 32, help="topk: weight of the auxiliary loss against dead latents."),
    buffer_rows: int = typer.Option(65536, min=1, help="Most rows held in memory (whole shards, shuffled together)."),
    seed: int = typer.Option(0), out: Path = typer.Option(..., help="SAE folder to write."),
):
    """Train an SAE on one token group of a features folder; writes the SAE (SAELens layout),
    metrics.jsonl, report.html and the sparse codes."""
    from .lm_capture import Features
    from .sae import default_width
    from .sae_train import TrainSettings, train_to_folder

    data = Features.load(features)
    settings = TrainSettings(architecture=arch, d_sae=default_width(data.meta["hidden_size"], width), k=k, steps=steps,
                             batch_size=batch_size, lr=lr, l1=l1, aux=aux, buffer_rows=buffer_rows, seed=seed,
                             log_every=max(1, steps // 20))
    log = lambda row: typer.echo(f"step {row['step']}: loss {row['loss']:.4g}, FVU {row['fvu']:.4f}, "
                                 f"L0 {row['l0']:.1f}, dead {row['dead']}")
    folder = train_to_folder(data, tokens, settings, out, on_log=log)
    evaluation = json.loads((folder / "evaluation.json").read_text())
    typer.echo(_line(tokens, evaluation[tokens]))
    typer.echo(f"SAE: {folder}\nreport: {folder / 'report.html'}")


@sae_app.command("eval")
def evaluate(
    sae: Path = typer.Option(..., help="SAE folder (ours or an imported one)."),
    features: Path = typer.Option(..., help="Features folder of the SAE's site (held-out rows)."),
    tokens: Optional[str] = typer.Option(None, help="Token groups, comma-separated (default: the SAE's own and all)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Also splice the SAE into this model."),
    checkpoint: Optional[str] = CHECKPOINT, dataset: Optional[Path] = DATASET, allow_outside: bool = ALLOW_OUTSIDE,
    max_new_tokens: int = typer.Option(16, min=1), batch_size: int = typer.Option(16, min=1),
    out: Optional[Path] = typer.Option(None, help="Write the results as JSON."),
    device: str = DEVICE, dtype: str = DTYPE,
):
    """FVU, explained variance, cosine, L0, dead and dense latents per token group; with --model,
    the SAE spliced in at its token group: answer CE, KL, greedy answers and % CE recovered."""
    from .atomic import write_file
    from .lm_capture import Features, Sample, load_samples
    from .sae import load_sae, sae_site
    from .sae_train import StreamedRows, evaluate_sae

    autoencoder, cfg = load_sae(sae)
    data = Features.load(features)
    site = sae_site(cfg)
    if site and site != data.site:
        raise UserError(f"the SAE reads site {site}; features '{features}' are of {data.site}")
    own = (cfg.get("mimic") or {}).get("tokens", "all")
    groups = [g.strip() for g in tokens.split(",")] if tokens else list(dict.fromkeys([own, "all"]))
    result = {"sae": str(sae), "features": str(features), "groups": {}}
    for group in groups:
        result["groups"][group] = evaluate_sae(autoencoder, StreamedRows(data, group))
        typer.echo(_line(group, result["groups"][group]))
    if model:
        from .sae_splice import splice_metrics

        samples = load_samples(None, dataset, None, allow_outside) if dataset else [
            Sample(e["id"], Path(e["image"]), e["question"], e.get("labels") or {}) for e in data.index]
        _, _, adapter = _load(model, checkpoint, None, device, dtype)
        spliced = splice_metrics(adapter, autoencoder, data.site, samples, own, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size)
        result["splice"] = spliced
        ce = spliced["ce"]
        typer.echo(f"spliced at {data.site} ({own} tokens, {spliced['samples']} samples): answer CE clean "
                   f"{ce['clean']:.4f}, SAE {ce['sae']:.4f}, zero-ablated {ce['zero']:.4f}; KL SAE "
                   f"{spliced['kl']['sae']:.4f}; greedy answers unchanged: SAE {spliced['unchanged']['sae']:.3f}, "
                   f"zero {spliced['unchanged']['zero']:.3f}")
        if "accuracy" in spliced:
            typer.echo("greedy accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in spliced["accuracy"].items()))
        typer.echo(spliced["note"] if spliced["recovered"] is None else f"CE recovered {100 * spliced['recovered']:.1f} %")
    if out:
        write_file(out, json.dumps(result, indent=2), new="--out")


@sae_app.command("import")
def import_sae(
    saelens: Path = typer.Option(..., help="A SAELens folder (cfg.json + sae_weights.safetensors)."),
    site: str = typer.Option(..., help="The toolkit site it reads (lm.embed, lm.I, ...)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The model id it belongs to (recorded)."),
    out: Path = typer.Option(..., help="SAE folder to write."),
):
    """Take an SAE in SAELens's layout (Gemma Scope, Llama Scope, ...) into an SAE folder that
    names its site; the sae-lens package is not needed."""
    from .atomic import atomic_folder, refuse_existing
    from .sae import load_sae, save_sae

    refuse_existing(out, "--out")
    autoencoder, cfg = load_sae(saelens)
    mimic = {"site": site, "model": model or cfg.get("model_name") or (cfg.get("metadata") or {}).get("model_name", ""),
             "imported_from": str(saelens), "saelens_hook": cfg.get("hook_name") or
             (cfg.get("metadata") or {}).get("hook_name", "")}
    with atomic_folder(out) as folder:
        save_sae(autoencoder, folder, mimic)
    typer.echo(f"{cfg['architecture']} SAE, {autoencoder.d_sae} latents on {autoencoder.d_in} inputs, site {site} -> {out}")


@sae_app.command("layers")
def layers(
    model: Optional[str] = MODEL, checkpoint: Optional[str] = CHECKPOINT,
    dataset: Path = typer.Option(..., help="Training images: JSON lines of {image, question?, id?, labels}."),
    test_dataset: Optional[Path] = typer.Option(None, help="Held-out images, the same way (default: the last "
                                                        "--test-fraction of --dataset)."),
    test_fraction: float = typer.Option(0.25, help="Without --test-dataset: the share of --dataset held out."),
    sites: str = typer.Option("lm.embed,lm.0", help="LM sites, comma-separated, in depth order."),
    groups: str = typer.Option("image,prompt,text-only", help="Token groups the SAEs are measured on."),
    arch: str = typer.Option("topk", "--arch"), k: int = typer.Option(16, "--k", min=1),
    # 2x, not train's 4x: on the toy 4x left 34-42 % of the latents dead, 2x 2-12 % (RESULTS.md)
    width: float = typer.Option(2.0, help="Latents as a multiple of the input width."),
    steps: int = typer.Option(2000, min=1), batch_size: int = typer.Option(256, min=1),
    lr: float = typer.Option(1e-3), seed: int = typer.Option(0),
    judge_latents: int = typer.Option(3, min=1, help="Top latents per image the exact judge reads."),
    judge_words: int = typer.Option(3, min=1, help="Grounded words per latent."),
    max_new_tokens: int = typer.Option(8, min=1), allow_outside: bool = ALLOW_OUTSIDE,
    out: Path = typer.Option(..., help="Study folder to write."), device: str = DEVICE, dtype: str = DTYPE,
):
    """Per site: an SAE on the training images' image tokens, measured on held-out images per
    token group (FVU, L0, dead, spliced CE) and for alignment with language (logit-lens
    readability, linear probe, latent purity, exact judge against shuffled labels)."""
    from .lm_capture import load_samples
    from .sae import default_width
    from .sae_study import run_layers
    from .sae_train import TrainSettings

    train_samples = load_samples(None, dataset, None, allow_outside)
    if test_dataset is not None:
        test_samples = load_samples(None, test_dataset, None, allow_outside)
    else:  # the last share held out: a dataset file in a fixed order splits the same way every time
        held_out = round(len(train_samples) * test_fraction) if 0 < test_fraction < 1 else 0
        if not 1 <= held_out < len(train_samples):
            raise UserError(f"--test-fraction {test_fraction} of {len(train_samples)} samples leaves no training or "
                            "no held-out sample; give --test-dataset")
        train_samples, test_samples = train_samples[:-held_out], train_samples[-held_out:]
    model_id, source, adapter = _load(model, checkpoint, None, device, dtype)
    settings = TrainSettings(architecture=arch, d_sae=default_width(adapter.hidden_size, width), k=k, steps=steps,
                             batch_size=batch_size, lr=lr, seed=seed, log_every=max(1, steps // 20))
    folder = run_layers(adapter, model_id, source, train_samples, test_samples,
                        [s.strip() for s in sites.split(",") if s.strip()], out, settings=settings,
                        groups=tuple(g.strip() for g in groups.split(",") if g.strip()),
                        judge_latents=judge_latents, judge_words=judge_words, max_new_tokens=max_new_tokens,
                        seed=seed, on_progress=typer.echo)
    typer.echo(f"study: {folder / 'study.json'}\nreport: {folder / 'report.html'}")


@sae_app.command("features")
def features_cards(
    sae: Path = typer.Option(..., help="SAE folder."),
    features: Path = typer.Option(..., help="Features folder of the SAE's site with image tokens."),
    top: int = typer.Option(16, min=1, help="Images per latent."),
    latents: int = typer.Option(32, min=1, help="Cards for this many latents, the most often active first."),
    no_words: bool = typer.Option(False, "--no-words", help="No grounded words (the model is not loaded)."),
    out: Path = typer.Option(..., help="Folder for index.html and cards.json."), device: str = DEVICE,
):
    """A card per latent: density, grounded words and its top images with a patch heatmap."""
    from .lm_capture import Features
    from .sae import load_sae, sae_site
    from .sae_cards import write_cards

    autoencoder, cfg = load_sae(sae)
    data = Features.load(features)
    if sae_site(cfg) and sae_site(cfg) != data.site:
        raise UserError(f"the SAE reads site {sae_site(cfg)}; features '{features}' are of {data.site}")
    adapter = None if no_words else _load(data.model, data.meta["checkpoint"] or None, data.meta.get("revision") or None,
                                          device, "float32")[2]
    folder = write_cards(autoencoder, cfg, data, out, adapter=adapter, top=top, latents=latents)
    typer.echo(f"cards: {folder / 'index.html'}")


def add_commands(app: typer.Typer) -> None:
    app.add_typer(sae_app, name="sae")
