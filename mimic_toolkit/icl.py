"""Learned in-context shift modules: MimIC and LIVE, their training, evaluation and application.

MimIC (per layer l and head h, before `o_proj`, at every position): `+ mu(q) * v_lh`, with
`mu = sigmoid(w_lh . q + b_lh - logsumexp_j(q . k_j * scale))` (q, k after RoPE; `icl_attention`).
Trained so that the zero-shot model's per-layer MLP outputs match the frozen model's reading k
demonstrations (MSE over the query's tokens, weight 1) plus `ce_weight` x the answer CE.
LIVE: one vector per layer added to the decoder layer's output, norm-preserving; trained with
KL(teacher || student) on the answer's logits plus `ce_weight` x the answer CE.

Teacher = the frozen model reading k demonstrations (turns before the query turn) and the query;
student = the same model reading the query alone, plus the module. `Prompt.query_start` aligns
them: every token from there on is the same in both.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_folder, refuse_existing
from .engine import format_prompt
from .errors import UserError
from .features import open_rgb
from .hooks import SiteHooks
from .icl_attention import ShiftedAttention, check_attention_interface, log_normaliser
from .jsonfile import read_json_lines
from .lm import LMRecorder, PositionPolicy, Steering, _first
from .lm_capture import Sample, load_samples
from .tensorfile import read_safetensors

FORMAT = "mimic-icl/1"
METHODS = ("mimic", "live")
DEMONSTRATIONS = ("images", "text")


# -- the modules ---------------------------------------------------------------------------------
def lm_shape(adapter) -> dict:
    """What a module must match: layer count, heads, head width, residual width."""
    attention = adapter.language_model.layers[0].self_attn
    heads = attention.config.num_attention_heads
    return {"layers": len(adapter.language_model.layers), "heads": heads,
            "head_dim": attention.o_proj.in_features // heads, "hidden_size": adapter.hidden_size}


class MimicModule(torch.nn.Module):
    """Per layer and head a vector `v`, a gate direction `w` and bias `b` (all zero at the start:
    the student starts as the zero-shot model)."""

    method = "mimic"

    def __init__(self, layers: int, heads: int, head_dim: int, hidden_size: int):
        super().__init__()
        self.shape = {"layers": layers, "heads": heads, "head_dim": head_dim, "hidden_size": hidden_size}
        self.v = torch.nn.Parameter(torch.zeros(layers, heads, head_dim))
        self.w = torch.nn.Parameter(torch.zeros(layers, heads, head_dim))
        self.b = torch.nn.Parameter(torch.zeros(layers, heads))
        self.gate_sums: torch.Tensor | None = None  # set to zeros [layers, heads + 1] to record mean gates

    def head_shift(self, layer, query, key, value, output, attention_mask, scale):
        log_own = log_normaliser(query, key, attention_mask, scale)  # [B, H, T] fp32
        gate = torch.sigmoid(torch.einsum("bhtd,hd->bht", query.float(), self.w[layer])
                             + self.b[layer][None, :, None] - log_own)
        if self.gate_sums is not None:
            self.gate_sums[layer, :-1] += gate.detach().sum((0, 2))
            self.gate_sums[layer, -1] += gate.shape[0] * gate.shape[2]
        return (gate[..., None] * self.v[layer][None, :, None]).transpose(1, 2)

    def applied(self, adapter):
        return ShiftedAttention(adapter, self)


class _LiveHooks(SiteHooks):
    prepend = True  # before the output-recording hooks transformers adds

    def __init__(self, adapter, module: "LiveModule"):
        super().__init__({f"lm.{i}": adapter.lm_site(f"lm.{i}") for i in range(module.shape["layers"])})
        self.module = module

    def on_output(self, site, output):
        states = _first(output)
        vector = self.module.v[int(site.split(".")[1])].to(states.dtype)
        shifted = states + vector
        shifted = shifted * (states.norm(dim=-1, keepdim=True) / shifted.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        return (shifted, *output[1:]) if isinstance(output, tuple) else shifted


class LiveModule(torch.nn.Module):
    """One vector per layer added to the decoder layer's output, rescaled to the state's norm."""

    method = "live"

    def __init__(self, layers: int, heads: int, head_dim: int, hidden_size: int):
        super().__init__()
        self.shape = {"layers": layers, "heads": heads, "head_dim": head_dim, "hidden_size": hidden_size}
        self.v = torch.nn.Parameter(torch.zeros(layers, hidden_size))

    def applied(self, adapter):
        return _LiveHooks(adapter, self)


MODULES = {"mimic": MimicModule, "live": LiveModule}


def new_module(method: str, adapter) -> torch.nn.Module:
    if method not in MODULES:
        raise UserError(f"--method must be {' or '.join(METHODS)}, not '{method}'")
    if method == "mimic":
        check_attention_interface(adapter, adapter.model_id)
    return MODULES[method](**lm_shape(adapter)).to(adapter.device)


def save_module(module, meta: dict, folder: Path) -> None:
    from safetensors.torch import save_file

    tensors = {name: p.detach().float().cpu().contiguous() for name, p in module.named_parameters()}
    save_file(tensors, str(folder / "module.safetensors"), metadata={"format": FORMAT, "method": module.method})
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(folder: Path) -> dict:
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise UserError(f"'{folder}' is not an icl module folder (no meta.json; make one with `mimic icl train`)")
    meta = read_json_lines(folder / "meta.json", whole=True)[0]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("method") not in METHODS:
        raise UserError(f"'{folder}/meta.json' is not an icl module's meta (format {FORMAT}, method mimic or live)")
    return meta


def load_module(folder: Path, adapter, model_id: str):
    """The module of `folder` for this model; a module of another model, width, head count or
    layer count is refused by name."""
    meta = read_meta(folder)
    if meta.get("model") != model_id:
        raise UserError(f"module '{folder}' was trained on model '{meta.get('model')}', not '{model_id}'")
    have = lm_shape(adapter)
    for key, value in have.items():
        if meta.get("shape", {}).get(key) != value:
            raise UserError(f"module '{folder}' has {key} {meta.get('shape', {}).get(key)}; model '{model_id}' "
                            f"has {value}")
    tensors, _ = read_safetensors(Path(folder) / "module.safetensors", "icl module file", format=FORMAT)
    module = MODULES[meta["method"]](**have)
    expected = {name: tuple(p.shape) for name, p in module.named_parameters()}
    if {name: tuple(t.shape) for name, t in tensors.items()} != expected:
        raise UserError(f"'{folder}/module.safetensors' does not hold a {meta['method']} module of shape {have}")
    module.load_state_dict(tensors)
    if meta["method"] == "mimic":
        check_attention_interface(adapter, model_id)
    return module.to(adapter.device).requires_grad_(False), meta


# -- data ----------------------------------------------------------------------------------------
@dataclass
class Split:
    """Demonstrations (drawn from for every teacher prompt), training and held-out queries."""

    demonstrations: list[Sample]
    train: list[Sample]
    held_out: list[Sample]
    seed: int

    def sizes(self) -> dict:
        return {"demonstrations": len(self.demonstrations), "train": len(self.train), "held_out": len(self.held_out)}

    def ids(self) -> dict:
        return {name: [s.id for s in part] for name, part in
                (("demonstrations", self.demonstrations), ("train", self.train), ("held_out", self.held_out))}


def load_dataset(path: Path, allow_outside: bool = False) -> list[Sample]:
    samples = load_samples(dataset=path, allow_outside=allow_outside)
    missing = [s.id for s in samples if not s.answer]
    if missing:
        raise UserError(f"dataset file '{path}': entry '{missing[0]}' has no \"answer\" (mimic icl needs one in each)")
    return samples


def dataset_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def split_dataset(samples: list[Sample], seed: int, demonstrations: int, held_out: int) -> Split:
    if demonstrations < 1 or held_out < 1:
        raise UserError("--demonstrations-pool and --held-out must be at least 1")
    if demonstrations + held_out >= len(samples):
        raise UserError(f"the dataset has {len(samples)} entries: too few for {demonstrations} demonstrations, "
                        f"{held_out} held-out queries and at least one training query")
    order = np.random.default_rng(seed).permutation(len(samples)).tolist()
    picked = [samples[i] for i in order]
    return Split(picked[:demonstrations], picked[demonstrations + held_out:],
                 picked[demonstrations:demonstrations + held_out], seed)


def split_from_meta(samples: list[Sample], meta: dict) -> Split:
    """The split a module was trained with, by the ids it recorded."""
    by_id = {s.id: s for s in samples}
    parts = {}
    for name, ids in meta["split"]["ids"].items():
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise UserError(f"the dataset lacks entry '{missing[0]}' of the module's {name} split (another dataset?)")
        parts[name] = [by_id[i] for i in ids]
    return Split(parts["demonstrations"], parts["train"], parts["held_out"], meta["split"]["seed"])


def demonstrations_for(split: Split, query: int, shots: int, stream: int) -> list[Sample]:
    """`shots` demonstrations for query number `query`, seeded by (split seed, stream, query)."""
    rng = np.random.default_rng([split.seed, stream, query])
    return [split.demonstrations[i] for i in rng.choice(len(split.demonstrations), shots, replace=False)]


def episode(adapter, query: Sample, demos: list[Sample], demonstrations: str):
    """(Prompt, image paths in order): the demonstrations' turns, then the query's."""
    turns = [(d.question, d.answer) for d in demos] + [(query.question, query.answer)]
    if demonstrations == "text":
        return format_prompt(adapter, turns, image_turns=(len(turns) - 1,)), [query.image]
    return format_prompt(adapter, turns, image_turns=tuple(range(len(turns)))), [d.image for d in demos] + [query.image]


class Images:
    """Preprocessed pixels per image file, the most recent `keep` kept: the same demonstrations
    recur in every batch (a bound, as large models take large images)."""

    def __init__(self, adapter, keep: int = 128):
        self.adapter, self.keep, self.cache = adapter, keep, OrderedDict()

    def __call__(self, paths: list[Path]) -> torch.Tensor:
        pixels = []
        for path in paths:
            if path in self.cache:
                self.cache.move_to_end(path)
            else:
                self.cache[path] = self.adapter.preprocess([open_rgb(path)])[0]
                if len(self.cache) > self.keep:
                    self.cache.popitem(last=False)
            pixels.append(self.cache[path])
        return torch.stack(pixels).to(self.adapter.device)


@dataclass
class Pass:
    """One batched forward: the logits of the last positions from `offset` on (every row's answer
    lies there; a full [B, L, V] would not fit for a large vocabulary) and recorded sites."""

    logits: torch.Tensor
    hidden: dict[str, torch.Tensor]
    prompts: list
    offset: int

    def query_positions(self, row: int) -> torch.Tensor:
        prompt = self.prompts[row]
        return torch.arange(prompt.query_start, len(prompt.input_ids))

    def answer_position(self, row: int) -> int:
        """The last prompt token: the position that predicts the answer's first token."""
        prompt = self.prompts[row]
        return len(prompt.input_ids) - prompt.n_target - 1

    def answer_logits(self, row: int) -> torch.Tensor:
        """The logits that predict each answer token, [n_answer, V]."""
        prompt = self.prompts[row]
        end = len(prompt.input_ids) - self.offset
        return self.logits[row, end - prompt.n_target - 1:end - 1]


def forward(adapter, images: Images, episodes: list, sites: list[str], module=None) -> Pass:
    prompts = [prompt for prompt, _ in episodes]
    pixels = images([path for _, paths in episodes for path in paths])
    inputs = {**adapter.pixel_inputs(pixels), **adapter.padded_text_inputs(prompts)}
    offset = min(len(p.input_ids) - p.n_target - 1 for p in prompts)
    keep = inputs["input_ids"].shape[1] - offset
    with LMRecorder(adapter, sites) as recorder, (module.applied(adapter) if module is not None else nullcontext()):
        logits = adapter.model(**inputs, use_cache=False, logits_to_keep=keep).logits
    return Pass(logits, recorder.hidden, prompts, offset)


def mlp_sites(adapter) -> list[str]:
    return [f"lm.{i}.mlp" for i in range(len(adapter.language_model.layers))]


# -- training ------------------------------------------------------------------------------------
def _losses(teacher: Pass, student: Pass, method: str, sites: list[str], ce_weight: float) -> dict:
    align, kl, ce = [], [], []
    for row in range(len(student.prompts)):
        t_pos, s_pos = teacher.query_positions(row), student.query_positions(row)
        if method == "mimic":
            align.append(torch.stack([F.mse_loss(student.hidden[site][row, s_pos].float(),
                                                 teacher.hidden[site][row, t_pos].float()) for site in sites]).mean())
        logits = student.answer_logits(row).float()
        target = student.prompts[row].target_ids.to(logits.device)
        ce.append(F.cross_entropy(logits, target))
        if method == "live":
            kl.append(F.kl_div(logits.log_softmax(-1), teacher.answer_logits(row).float().log_softmax(-1),
                               log_target=True, reduction="batchmean"))
    parts = {"ce": torch.stack(ce).mean()}
    parts["align" if method == "mimic" else "kl"] = torch.stack(align if method == "mimic" else kl).mean()
    parts["loss"] = parts["align" if method == "mimic" else "kl"] + ce_weight * parts["ce"]
    return parts


def _schedule(optimizer, steps: int, warmup: float):
    warm = max(1, int(steps * warmup))

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_recipe(split: Split, *, shots: int, steps: int, batch_size: int, lr: float, warmup: float,
                 ce_weight: float) -> None:
    """Bad settings are one line, before the model loads."""
    if shots < 1:
        raise UserError("--shots for training must be at least 1 (the teacher reads demonstrations)")
    if shots > len(split.demonstrations):
        raise UserError(f"--shots {shots} is more than the {len(split.demonstrations)} demonstrations")
    for name, value in (("--steps", steps), ("--batch-size", batch_size)):
        if value < 1:
            raise UserError(f"{name} must be at least 1")
    if not (lr > 0 and math.isfinite(lr)) or not ce_weight >= 0 or not 0 <= warmup <= 1:
        raise UserError("--lr must be positive, --ce-weight at least 0 and --warmup between 0 and 1")


def train(adapter, split: Split, method: str, *, shots: int, demonstrations: str, steps: int, batch_size: int,
          lr: float, warmup: float, ce_weight: float, log=print):
    """Train a module: returns (module, per-step metrics, seconds)."""
    check_recipe(split, shots=shots, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, ce_weight=ce_weight)
    module = new_module(method, adapter)
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
    scheduler = _schedule(optimizer, steps, warmup)
    sites = mlp_sites(adapter) if method == "mimic" else []
    images = Images(adapter)
    rng = np.random.default_rng([split.seed, 11])
    history, started = [], time.time()
    for step in range(steps):
        rows = rng.choice(len(split.train), batch_size, replace=len(split.train) < batch_size).tolist()
        queries = [split.train[i] for i in rows]
        with torch.no_grad():
            teacher = forward(adapter, images, [episode(adapter, q, demonstrations_for(split, i, shots, step + 1),
                                                        demonstrations) for q, i in zip(queries, rows)], sites)
        student = forward(adapter, images, [episode(adapter, q, [], demonstrations) for q in queries], sites, module)
        parts = _losses(teacher, student, method, sites, ce_weight)
        optimizer.zero_grad()
        parts["loss"].backward()
        optimizer.step()
        scheduler.step()
        record = {"kind": "step", "step": step, **{k: round(float(v.detach()), 6) for k, v in parts.items()},
                  "lr": scheduler.get_last_lr()[0]}
        if not math.isfinite(record["loss"]):
            raise UserError(f"the loss became {record['loss']} at step {step}; try a lower --lr")
        history.append(record)
        if log and (step % 20 == 0 or step == steps - 1):
            log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k != "kind"))
    return module.requires_grad_(False), history, time.time() - started


# -- evaluation ----------------------------------------------------------------------------------
def _correct(p: Pass, row: int) -> bool:
    target = p.prompts[row].target_ids.to(p.logits.device)
    return bool((p.answer_logits(row).argmax(-1) == target).all())


def _predicted(p: Pass, row: int) -> list[int]:
    return p.answer_logits(row).argmax(-1).tolist()


def _kl(teacher: Pass, student: Pass, row: int) -> float:
    t = teacher.answer_logits(row).float().log_softmax(-1)
    s = student.answer_logits(row).float().log_softmax(-1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def _distances(teacher: Pass, student: Pass, row: int, sites: list[str]) -> list[float]:
    t_pos, s_pos = teacher.query_positions(row), student.query_positions(row)
    return [float((student.hidden[s][row, s_pos].float() - teacher.hidden[s][row, t_pos].float()).norm(dim=-1).mean())
            for s in sites]


@torch.no_grad()
def shot_accuracy(adapter, split: Split, shots: list[int], demonstrations: str, batch_size: int = 16) -> dict:
    """Held-out accuracy per shot count (no module): the answer's tokens are the argmax at every
    answer position (what greedy decoding produces for the answer)."""
    images = Images(adapter)
    result = {}
    for k in shots:
        if k > len(split.demonstrations):
            raise UserError(f"{k} shots is more than the {len(split.demonstrations)} demonstrations")
        correct = 0
        for start in range(0, len(split.held_out), batch_size):
            queries = split.held_out[start:start + batch_size]
            p = forward(adapter, images, [episode(adapter, q, demonstrations_for(split, start + j, k, 0), demonstrations)
                                          for j, q in enumerate(queries)], [])
            correct += sum(_correct(p, r) for r in range(len(queries)))
        result[k] = correct / len(split.held_out)
    return result


@torch.no_grad()
def compare(adapter, module, split: Split, shots: int, demonstrations: str, *, side: list[Sample] | None = None,
            batch_size: int = 16) -> dict:
    """Teacher (k shots) vs zero-shot vs zero-shot + module on the held-out queries: accuracy, KL
    to the teacher's answer distribution, per-layer MLP-output distance to the teacher and the
    fraction of the zero-shot gap closed; on `side` queries (other questions) the answers the
    module changes."""
    images, sites = Images(adapter), mlp_sites(adapter)
    rows = []
    if isinstance(module, MimicModule):
        module.gate_sums = torch.zeros(module.shape["layers"], module.shape["heads"] + 1, device=adapter.device)
    for start in range(0, len(split.held_out), batch_size):
        queries = split.held_out[start:start + batch_size]
        teacher = forward(adapter, images, [episode(adapter, q, demonstrations_for(split, start + j, shots, 0),
                                                    demonstrations) for j, q in enumerate(queries)], sites)
        zero_episodes = [episode(adapter, q, [], demonstrations) for q in queries]
        zero = forward(adapter, images, zero_episodes, sites)
        shifted = forward(adapter, images, zero_episodes, sites, module)
        for r in range(len(queries)):
            rows.append({"teacher": _correct(teacher, r), "zero": _correct(zero, r), "module": _correct(shifted, r),
                         "kl_zero": _kl(teacher, zero, r), "kl_module": _kl(teacher, shifted, r),
                         "distance_zero": _distances(teacher, zero, r, sites),
                         "distance_module": _distances(teacher, shifted, r, sites)})
    mean = lambda key: float(np.mean([r[key] for r in rows]))
    layer_mean = lambda key: np.mean([r[key] for r in rows], axis=0).tolist()
    d_zero, d_module = layer_mean("distance_zero"), layer_mean("distance_module")
    result = {
        "queries": len(rows), "shots": shots,
        "accuracy": {"zero_shot": mean("zero"), "teacher": mean("teacher"), "module": mean("module")},
        "kl_to_teacher": {"zero_shot": mean("kl_zero"), "module": mean("kl_module")},
        "mlp_distance": {"zero_shot": d_zero, "module": d_module,
                         "gap_closed": [1 - m / z if z > 0 else 0.0 for z, m in zip(d_zero, d_module)]},
    }
    if isinstance(module, MimicModule):
        sums = module.gate_sums.cpu()
        result["mean_gate"] = (sums[:, :-1] / sums[:, -1:].clamp_min(1)).tolist()
        module.gate_sums = None
    if side:
        result["side_effects"] = side_effects(adapter, module, side, images, batch_size)
    return result


@torch.no_grad()
def side_effects(adapter, module, side: list[Sample], images: Images, batch_size: int = 16) -> dict:
    """Other questions (zero-shot): accuracy without and with the module, and the share of
    answers it changes."""
    without = with_module = changed = 0
    for start in range(0, len(side), batch_size):
        episodes = [episode(adapter, q, [], "text") for q in side[start:start + batch_size]]
        plain, shifted = forward(adapter, images, episodes, []), forward(adapter, images, episodes, [], module)
        for r in range(len(episodes)):
            without += _correct(plain, r)
            with_module += _correct(shifted, r)
            changed += _predicted(plain, r) != _predicted(shifted, r)
    n = len(side)
    return {"queries": n, "questions": sorted({q.question for q in side}), "accuracy_without": without / n,
            "accuracy_with": with_module / n, "changed": changed / n}


def describe(adapter, module, count: int = 5) -> list[dict]:
    """What the module writes: MimIC, each head's vector through `o_proj` into the residual stream;
    LIVE, each layer's vector; grounded in words through the unembedding (`concepts.ground_words`)."""
    from .concepts import ground_words

    rows = []
    if isinstance(module, MeanDifference):
        words = ground_words(adapter, module.vector[None].float(), count=count)
        return [{"layer": module.layer, "head": None, "norm": float(module.vector.norm()), "words": words[0]}]
    if isinstance(module, MimicModule):
        heads, d = module.shape["heads"], module.shape["head_dim"]
        for layer, block in enumerate(adapter.language_model.layers):
            weight = block.self_attn.o_proj.weight.float()
            vectors = torch.stack([weight[:, h * d:(h + 1) * d] @ module.v[layer, h].to(weight.device)
                                   for h in range(heads)])
            words = ground_words(adapter, vectors, count=count)
            rows += [{"layer": layer, "head": h, "norm": float(vectors[h].norm()), "words": words[h]} for h in range(heads)]
    else:
        words = ground_words(adapter, module.v.float(), count=count)
        rows = [{"layer": layer, "head": None, "norm": float(module.v[layer].norm()), "words": words[layer]}
                for layer in range(module.shape["layers"])]
    return rows


class MeanDifference:
    """The baseline: a steering vector, the mean over training queries of (teacher - zero-shot)
    states of `lm.{layer}` at the position that predicts the answer (the last prompt token),
    times `alpha`, added at every position (`lm.Steering`)."""

    method = "mean-difference"

    def __init__(self, vector: torch.Tensor, layer: int):
        self.vector, self.layer = vector, layer

    def applied(self, adapter):
        return Steering(adapter, f"lm.{self.layer}", self.vector, 1.0, PositionPolicy("all"))

    def parameters(self):
        return [self.vector]


@torch.no_grad()
def mean_difference(adapter, split: Split, shots: int, demonstrations: str, layer: int, *, alpha: float = 1.0,
                    queries: int = 256, batch_size: int = 16) -> MeanDifference:
    layers = len(adapter.language_model.layers)
    if not -layers <= layer < layers:
        raise UserError(f"--layer must be in {-layers} .. {layers - 1} for this model, not {layer}")
    layer %= layers
    site, images, total, count = f"lm.{layer}", Images(adapter), 0.0, 0
    train = split.train[:queries]
    for start in range(0, len(train), batch_size):
        batch = train[start:start + batch_size]
        teacher = forward(adapter, images, [episode(adapter, q, demonstrations_for(split, start + j, shots, 1),
                                                    demonstrations) for j, q in enumerate(batch)], [site])
        zero = forward(adapter, images, [episode(adapter, q, [], demonstrations) for q in batch], [site])
        for r in range(len(batch)):
            total = total + (teacher.hidden[site][r, teacher.answer_position(r)].float()
                             - zero.hidden[site][r, zero.answer_position(r)].float())
            count += 1
    return MeanDifference(alpha * total / count, layer)


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- outputs -------------------------------------------------------------------------------------
def versions() -> dict:
    import transformers

    from . import __version__

    return {"mimic_toolkit": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def write_folder(out: Path, *, meta: dict, metrics: list[dict], report: str, module=None) -> Path:
    """module.safetensors (if any), meta.json, metrics.jsonl and report.html, into `<out>.partial`
    renamed to `out`; an existing `out` is refused before anything is written."""
    refuse_existing(Path(out), "--out")
    with atomic_folder(out) as folder:
        if module is not None:
            save_module(module, meta, folder)
        else:
            (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        (folder / "report.html").write_text(report, encoding="utf-8")
    return Path(out)


def report_html(meta: dict, evaluation: dict | None, shots: dict | None, description: list[dict] | None) -> str:
    from . import htmlkit as h

    parts = [h.heading(f"mimic icl: {meta.get('method') or 'shots'} on {meta['model']}"),
             h.facts({k: v for k, v in meta.items() if k in ("model", "checkpoint", "method", "shots", "demonstrations",
                                                             "parameters", "training_seconds", "dataset_hash")})]
    if shots:
        parts += [h.heading("Held-out accuracy per shot count", 2),
                  h.table(["shots", "accuracy"], [[k, f"{v:.3f}"] for k, v in shots.items()])]
    if evaluation:
        acc, kl = evaluation["accuracy"], evaluation["kl_to_teacher"]
        parts += [h.heading(f"Zero-shot + module vs the {evaluation['shots']}-shot teacher "
                            f"({evaluation['queries']} held-out queries)", 2),
                  h.table(["", "accuracy", "KL(teacher || this) at the answer"],
                          [["zero-shot", f"{acc['zero_shot']:.3f}", f"{kl['zero_shot']:.4f}"],
                           [f"{evaluation['shots']}-shot teacher", f"{acc['teacher']:.3f}", "0"],
                           ["zero-shot + module", f"{acc['module']:.3f}", f"{kl['module']:.4f}"]]),
                  h.heading("Per-layer MLP-output distance to the teacher (query tokens)", 2)]
        dist = evaluation["mlp_distance"]
        parts.append(h.table(["layer", "zero-shot", "with module", "gap closed"],
                             [[i, f"{z:.4f}", f"{m:.4f}", f"{g:+.1%}"] for i, (z, m, g) in
                              enumerate(zip(dist["zero_shot"], dist["module"], dist["gap_closed"]))]))
        if "side_effects" in evaluation:
            side = evaluation["side_effects"]
            parts += [h.heading("Side effects: other questions, zero-shot: " + " / ".join(side["questions"][:3]), 2),
                      h.table(["queries", "accuracy without", "accuracy with module", "answers changed"],
                              [[side["queries"], f"{side['accuracy_without']:.3f}", f"{side['accuracy_with']:.3f}",
                                f"{side['changed']:.3f}"]])]
        if "mean_gate" in evaluation:
            gates = evaluation["mean_gate"]
            parts += [h.heading("Mean gate mu per layer and head (held-out zero-shot passes)", 2),
                      h.table(["layer"] + [f"head {j}" for j in range(len(gates[0]))],
                              [[i] + [f"{g:.4f}" for g in row] for i, row in enumerate(gates)])]
    if description:
        parts += [h.heading("What the module writes, grounded in words", 2),
                  h.table(["layer", "head", "norm in the residual stream", "top words"],
                          [[r["layer"], "-" if r["head"] is None else r["head"], f"{r['norm']:.3f}", ", ".join(r["words"])]
                           for r in description])]
    return h.page(f"mimic icl {meta['model']}", *parts)
