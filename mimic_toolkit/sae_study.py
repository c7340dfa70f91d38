"""`mimic sae layers`: where visual features become readable as language features, layer by
layer (the vlm-mapping study), without a paid judge: every measure is exact where the dataset's
labels give the truth.

Per site, an SAE is trained on the image tokens of the training images; on held-out images it is
measured per token group (the `image` tokens, the `prompt` text after the image, and `text-only`:
the same chat with the image replaced by its description in words, labels["answer"] or the
model's own answer): FVU, L0 and dead latents; the SAE spliced in at the image positions (answer
CE, % recovered, greedy answers unchanged); and alignment with language:
- readability: the image tokens' mean log-softmax through the unembedding (logit lens), its top
  whole word names one of the image's label words;
- probe: a linear probe on the mean image token decodes each label (information present, readable
  or not: a different claim);
- purity: per live latent, the share of its top images that agree on a label;
- judge: the seed's protocol with an exact judge: of an image's top latents, the share whose
  grounded words (unembedded decoder direction) name one of its label words, minus the same with
  the labels shuffled across images (the chance level of the words).
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch

from .atomic import atomic_folder, refuse_existing
from .concepts import ground_words, whole_word_tokens
from .engine import format_prompt
from .errors import UserError
from .features import adapter_revision
from .hooks import SiteHooks
from .lm import LMRecorder
from .lm_capture import FeatureWriter, Features, by_question, open_images, until_end
from .sae import load_sae
from .sae_splice import splice_metrics
from .sae_train import StreamedRows, TrainSettings, evaluate_sae, train_to_folder

GROUPS = ("image", "prompt", "text-only")
IMAGE_SITES = ("vision.out", "projector.out")  # before the language model: image tokens only


class ImageTokens(SiteHooks):
    """Records image sites (`vision.out`, `projector.out`) as [B, tokens, channels]."""

    def __init__(self, adapter, sites: list[str], batch_size: int):
        available = adapter.image_sites()
        super().__init__({site: available[site] for site in sites})
        self.adapter, self.batch_size, self.tokens = adapter, batch_size, {}

    def on_output(self, site, output):
        self.tokens[site] = self.adapter.site_tokens(site, output, self.batch_size)


@torch.no_grad()
def capture_sites(adapter, model_id: str, checkpoint: str, samples, sites: list[str], folder: Path, *,
                  text_only: dict | None = None, batch_size: int = 16) -> dict[str, Features]:
    """Every position of every site in one forward per batch, a features folder per site
    (`--tokens all` layout). An image site's rows are its own tokens, all counted as image
    tokens. With `text_only` ({sample id: description}), the prompt is the chat without the image
    whose user message is the description followed by the question (LM sites only)."""
    image_sites = [site for site in sites if site in IMAGE_SITES]
    lm_sites = [site for site in sites if site not in IMAGE_SITES]
    if text_only:
        sites, image_sites = lm_sites, []
    writers = {site: FeatureWriter(folder / site.replace(".", "-")) for site in sites}
    widths = {}
    for question, group in by_question(samples):
        prompt = None if text_only else format_prompt(adapter, [(question, "")], target=False)
        step = batch_size if prompt else 1
        for start in range(0, len(group), step):
            batch = group[start:start + step]
            if prompt is None:
                text_prompt = format_prompt(adapter, [(f"{text_only[batch[0].id]}\n{question}", "")], target=False,
                                            image_turns=())
                inputs = adapter.text_inputs(text_prompt, 1)
                length, image_positions = len(text_prompt.input_ids), []
            else:
                inputs = {**adapter.pixel_inputs(adapter.preprocess(open_images(batch))),
                          **adapter.text_inputs(prompt, len(batch))}
                length, image_positions = len(prompt.input_ids), prompt.image_positions.tolist()
            with LMRecorder(adapter, lm_sites) as recorder, ImageTokens(adapter, image_sites, len(batch)) as images:
                adapter.model(**inputs, use_cache=False, logits_to_keep=1)
            states = {**recorder.hidden, **images.tokens}
            for site in sites:
                hidden = states[site].float().cpu()
                widths[site] = hidden.shape[-1]
                count = hidden.shape[1] if site in image_sites else length
                own = list(range(count)) if site in image_sites else image_positions
                for b, sample in enumerate(batch):
                    writers[site].add({"id": sample.id, "image": str(sample.image), "question": question,
                                       "prompt_length": count, "image_positions": own, "labels": sample.labels,
                                       "positions": list(range(count))}, hidden[b])
    meta = {"model": model_id, "checkpoint": checkpoint, "revision": adapter_revision(adapter), "selector": "all"}
    return {site: Features.load(writers[site].finish({**meta, "site": site, "hidden_size": widths[site]}))
            for site in sites}


def label_words(labels: dict) -> set[str]:
    return {w for value in labels.values() if isinstance(value, str) for w in re.findall(r"[a-z]+", value.lower())}


def _image_rows(features: Features) -> list[torch.Tensor]:
    """Each sample's image-token rows, [image tokens, D] (rows of `--tokens all` features: one per position)."""
    source = StreamedRows(features, "image")
    rows = []
    for number in range(len(source.selected)):
        shard, start = source.shard(number), 0
        for _, offsets in source.samples[number]:
            rows.append(shard[start:start + len(offsets)])
            start += len(offsets)
    return rows


@torch.no_grad()
def readability(adapter, image_rows: list[torch.Tensor], labels: list[dict], vocabulary: dict[int, str],
                final_norm: bool) -> float:
    ids = torch.tensor(list(vocabulary))
    hits = 0
    for rows, label in zip(image_rows, labels):
        logp = adapter.unembed(rows.to(adapter.device), apply_final_norm=final_norm).log_softmax(-1).mean(0).cpu()
        top = vocabulary[int(ids[logp[ids].argmax()])].lower()
        hits += top in label_words(label)
    return hits / len(image_rows)


def probe_accuracy(train_x: torch.Tensor, train_y: list[str], test_x: torch.Tensor, test_y: list[str],
                   steps: int = 300) -> float:
    """A multinomial logistic regression on standardised inputs (full-batch Adam, weight decay);
    accuracy on the test rows. Classes unseen in training count as wrong."""
    classes = sorted(set(train_y))
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    x, xt = (train_x - mean) / std, (test_x - mean) / std
    y = torch.tensor([classes.index(c) for c in train_y])
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(x.shape[1], len(classes), generator=generator) * 0.01).requires_grad_(True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimiser = torch.optim.Adam([weight, bias], lr=0.05, weight_decay=1e-3)
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(x @ weight + bias, y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    predicted = (xt @ weight + bias).argmax(1).tolist()
    return sum(classes[p] == t for p, t in zip(predicted, test_y)) / len(test_y)


def latent_purity(activations: torch.Tensor, labels: list[str], top: int = 10) -> float:
    """Mean over latents active on at least `top` images of the most common label's share among
    its `top` most active images."""
    shares = []
    for column in activations.T:
        if int((column > 0).sum()) < top:
            continue
        chosen = column.topk(top).indices.tolist()
        shares.append(Counter(labels[i] for i in chosen).most_common(1)[0][1] / top)
    return sum(shares) / len(shares) if shares else float("nan")


def judge_match(activations: torch.Tensor, latent_words: list[list[str]], labels: list[dict], latents: int) -> float:
    """The share of each image's top `latents` latents whose words name one of its label words."""
    hits = total = 0
    for values, label in zip(activations, labels):
        words = label_words(label)
        for latent in values.topk(latents).indices.tolist():
            if values[latent] <= 0:
                continue
            hits += bool(words & set(latent_words[latent]))
            total += 1
    return hits / total if total else float("nan")


def run_layers(adapter, model_id: str, checkpoint: str, train_samples, test_samples, sites: list[str], out, *,
               settings: TrainSettings, groups=GROUPS, judge_latents: int = 3, judge_words: int = 3,
               max_new_tokens: int = 8, seed: int = 0, on_progress=print) -> Path:
    """The study; writes `out` (features, one SAE per site, study.json, report.html)."""
    from .sae_report import layers_page

    out = Path(out)
    refuse_existing(out, "--out")
    for name in groups:
        if name not in GROUPS:
            raise UserError(f"--groups must name {', '.join(GROUPS)}, not '{name}'")
    for site in sites:
        if site in IMAGE_SITES:
            if site not in adapter.image_sites():
                raise UserError(f"this model's adapter names no projector, so it has no site {site}")
        else:
            adapter.lm_site(site)
    keys = sorted(set.intersection(*(set(s.labels) - {"answer"} for s in train_samples + test_samples)))
    if not keys:
        raise UserError("the datasets' samples need labels (e.g. {\"colour\": ..., \"shape\": ...}) to measure against")
    vocabulary = whole_word_tokens(adapter.tokenizer)
    with atomic_folder(out) as folder:
        on_progress("capturing the training and held-out images")
        train = capture_sites(adapter, model_id, checkpoint, train_samples, sites, folder / "features" / "train")
        test = capture_sites(adapter, model_id, checkpoint, test_samples, sites, folder / "features" / "test")
        text = None
        if "text-only" in groups:
            descriptions = {}
            for sample in test_samples:
                given = sample.answer or sample.labels.get("answer")  # the dataset's answer, or a label of it
                descriptions[sample.id] = given if isinstance(given, str) else None
            if any(d is None for d in descriptions.values()):
                answers = _answers(adapter, test_samples, max_new_tokens)
                descriptions = {k: v if v is not None else answers[k] for k, v in descriptions.items()}
            text = capture_sites(adapter, model_id, checkpoint, test_samples, sites, folder / "features" / "text-only",
                                 text_only=descriptions)
        rows = []
        for site in sites:
            on_progress(f"{site}: training the SAE on {StreamedRows(train[site], 'image').rows} image-token rows")
            sae_folder = train_to_folder(train[site], "image", settings, folder / "saes" / site.replace(".", "-"))
            sae, _ = load_sae(sae_folder)
            trained = json.loads((sae_folder / "evaluation.json").read_text())["image"]  # on its training rows
            row = {"site": site, "train": trained, "groups": {}}
            in_lm = site not in IMAGE_SITES
            for group in groups:  # before the LM there are image tokens only
                source = (StreamedRows(text[site], "all") if group == "text-only" else StreamedRows(test[site], group)) \
                    if in_lm or group == "image" else None
                row["groups"][group] = evaluate_sae(sae, source) if source else None
            row["splice"] = None
            if in_lm:
                on_progress(f"{site}: splicing the SAE in at the image positions")
                row["splice"] = splice_metrics(adapter, sae, site, test_samples, "image", max_new_tokens=max_new_tokens)
            final_norm = site != "lm.final_norm"
            readable = sae.d_in == adapter.hidden_size  # the unembedding reads the LM's width only
            train_images, test_images = _image_rows(train[site]), _image_rows(test[site])
            test_labels = [e["labels"] for e in test[site].index]
            row["readability"] = readability(adapter, test_images, test_labels, vocabulary, final_norm) \
                if readable else None
            train_mean = torch.stack([r.mean(0) for r in train_images])
            test_mean = torch.stack([r.mean(0) for r in test_images])
            row["probe"] = {key: probe_accuracy(train_mean, [e["labels"][key] for e in train[site].index], test_mean,
                                                [e["labels"][key] for e in test[site].index]) for key in keys}
            with torch.no_grad():
                codes = [sae.encode(r) for r in test_images]
            strongest = torch.stack([c.amax(0) for c in codes])
            mean_codes = torch.stack([c.mean(0) for c in codes])
            row["purity"] = {key: latent_purity(strongest, [lab[key] for lab in test_labels]) for key in keys}
            row["judge"] = None
            if readable:
                words = ground_words(adapter, sae.W_dec.to(adapter.device), apply_final_norm=final_norm,
                                     count=judge_words, vocabulary=vocabulary)
                order = torch.randperm(len(test_labels), generator=torch.Generator().manual_seed(seed)).tolist()
                match = judge_match(mean_codes, words, test_labels, judge_latents)
                control = judge_match(mean_codes, words, [test_labels[i] for i in order], judge_latents)
                row["judge"] = {"match": match, "shuffled": control, "difference": match - control,
                                "latents": judge_latents, "words": judge_words}
            rows.append(row)
            on_progress(_summary(row))
        study = {"model": model_id, "checkpoint": checkpoint, "sites": sites, "groups": list(groups),
                 "train_samples": len(train_samples), "test_samples": len(test_samples), "label_keys": keys,
                 "settings": settings.__dict__, "rows": rows}
        (folder / "study.json").write_text(json.dumps(study, indent=2))
        (folder / "report.html").write_text(layers_page(study), encoding="utf-8")
    return out


@torch.no_grad()
def _answers(adapter, samples, max_new_tokens: int) -> dict[str, str]:
    answers = {}
    for question, group in by_question(samples):
        prompt = format_prompt(adapter, [(question, "")], target=False)
        for start in range(0, len(group), 16):
            batch = group[start:start + 16]
            new = adapter.generate(adapter.preprocess(open_images(batch)), prompt, max_new_tokens).tolist()
            for sample, ids in zip(batch, new):
                answers[sample.id] = adapter.tokenizer.decode(until_end(adapter, ids), skip_special_tokens=True)
    return answers


def _summary(row: dict) -> str:
    fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
    image, splice, judge = row["groups"].get("image") or {}, row["splice"], row["judge"]
    if splice is None:
        spliced = "not spliced (before the LM)"
    else:
        recovered = "not read downstream" if splice["recovered"] is None else f"{100 * splice['recovered']:.1f} %"
        spliced = f"CE recovered {recovered}, answers unchanged {fmt(splice['unchanged']['sae'])}"
    return (f"{row['site']}: image FVU {fmt(image.get('fvu'))}, L0 {fmt(image.get('l0'))}, dead "
            f"{fmt(image.get('dead_fraction'))}; {spliced}; readability {fmt(row['readability'])}; probe "
            + ", ".join(f"{k} {fmt(v)}" for k, v in row["probe"].items())
            + (f"; judge {fmt(judge['match'])} vs shuffled {fmt(judge['shuffled'])}" if judge else ""))
