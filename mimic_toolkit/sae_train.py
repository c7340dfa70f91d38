"""Training and evaluating SAEs on a features folder's rows, streamed shard by shard.

Rows are chosen by token group from the index's positions: `image` tokens, the `prompt` text
(every prompt token that is not an image token), the `answer` (generated tokens) or `all`. The
trainer holds at most `buffer_rows` rows (whole shards, mixed and shuffled together) plus one
batch, so a features folder larger than memory trains; `InMemoryRows` gives the same batches
from one matrix (what the streamed trainer is tested against).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .lm_capture import FORMAT as FEATURES_FORMAT, Features
from .sae import CODES_FORMAT, SparseAutoencoder, top_codes
from .tensorfile import read_safetensors

GROUPS = ("image", "prompt", "answer", "all")


# -- rows by token group ---------------------------------------------------------------------------
def group_offsets(features: Features, entry: dict, group: str) -> list[int]:
    """Which of a sample's rows (0 .. n-1) belong to `group`."""
    start, end = entry["rows"]
    count = end - start
    if group == "all":
        return list(range(count))
    positions = entry.get("positions")
    if not isinstance(positions, list) or len(positions) != count:
        raise UserError(f"features '{features.folder}' (tokens {features.meta['selector']}) have no position per "
                        f"row; only --tokens all reads them")
    if group == "answer":
        return [n for n, p in enumerate(positions) if p >= entry["prompt_length"]]
    if "image_positions" in entry:
        image = set(entry["image_positions"])
    elif features.meta["selector"] in ("image", "prompt"):  # captured before the index named image positions
        image = set(positions) if features.meta["selector"] == "image" else set()
    else:
        raise UserError(f"features '{features.folder}' do not say where the image tokens are (captured by an older "
                        "version); capture them again")
    if group == "image":
        return [n for n, p in enumerate(positions) if p in image]
    return [n for n, p in enumerate(positions) if p not in image and p < entry["prompt_length"]]


class StreamedRows:
    """The rows of one token group, one shard at a time."""

    def __init__(self, features: Features, group: str):
        if group not in GROUPS:
            raise UserError(f"--tokens must be one of {', '.join(GROUPS)}, not '{group}'")
        self.features, self.group = features, group
        shards = features.meta["shards"]
        self.selected: list = [[] for _ in shards]  # per shard: its rows in the group
        self.samples: list[list[tuple[int, list[int]]]] = [[] for _ in shards]  # per shard: (sample, offsets)
        for n, entry in enumerate(features.index):
            shard = entry.get("shard", 0)
            if not isinstance(shard, int) or not 0 <= shard < len(shards):
                raise UserError(f"features folder '{features.folder}' is damaged: index entry {n} names shard {shard!r}")
            offsets = group_offsets(features, entry, group)
            self.selected[shard] += [entry["rows"][0] + o for o in offsets]
            self.samples[shard].append((n, offsets))
        self.selected = [torch.tensor(rows, dtype=torch.long) for rows in self.selected]  # compact: one int64 a row
        self.rows = sum(map(len, self.selected))
        if not self.rows:
            raise UserError(f"features '{features.folder}' have no rows of token group '{group}'")
        self.width = features.meta["hidden_size"]
        self.peak_rows = 0  # the most rows held at once (the memory cap's test)

    def shard(self, number: int) -> torch.Tensor:
        """The group's rows of shard `number`, [n, D] fp32."""
        path = self.features.folder / str(self.features.meta["shards"][number])
        tensors, _ = read_safetensors(path, "features shard", format=FEATURES_FORMAT)
        hidden = tensors.get("hidden")
        if hidden is None or hidden.ndim != 2 or hidden.shape[1] != self.width:
            raise UserError(f"features shard '{path}' must hold 'hidden' [rows, {self.width}]")
        wanted = self.selected[number]
        if len(wanted) and int(wanted[-1]) >= len(hidden):
            raise UserError(f"features shard '{path}' has {len(hidden)} rows; the index needs {wanted[-1] + 1}")
        return hidden[wanted].float()

    def mean_norm(self) -> float:
        total = 0.0
        for number in range(len(self.selected)):
            total += float(self.shard(number).double().norm(dim=1).sum())
        return total / self.rows

    def batches(self, batch_size: int, buffer_rows: int, seed: int):
        """Endless batches [batch_size, D]: each pass visits the shards in a new seeded order,
        mixing consecutive shards into a buffer of at most `buffer_rows` rows that is shuffled;
        rows left over at a buffer's end start the next one."""
        generator = torch.Generator().manual_seed(seed)
        carry = torch.zeros(0, self.width)
        while True:
            order = torch.randperm(len(self.selected), generator=generator).tolist()
            while order:
                parts, held = [], 0
                while order and (not parts or held + len(self.selected[order[0]]) <= buffer_rows):
                    parts.append(self.shard(order.pop(0)))
                    held += len(parts[-1])
                buffer = torch.cat([carry, *parts])
                self.peak_rows = max(self.peak_rows, len(buffer))
                buffer = buffer[torch.randperm(len(buffer), generator=generator)]
                whole = len(buffer) // batch_size * batch_size
                for start in range(0, whole, batch_size):
                    yield buffer[start:start + batch_size]
                carry = buffer[whole:]


class InMemoryRows(StreamedRows):
    """The same rows and batches from all shards read at once (for tests and small folders)."""

    def __init__(self, features: Features, group: str):
        super().__init__(features, group)
        self._shards = [StreamedRows.shard(self, n) for n in range(len(self.selected))]

    def shard(self, number: int) -> torch.Tensor:
        return self._shards[number]


# -- training ----------------------------------------------------------------------------------------
@dataclass
class TrainSettings:
    architecture: str = "topk"
    d_sae: int = 512
    k: int | None = 16
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    l1: float = 1.0  # relu: the L1 weight on decoder-norm-weighted codes
    aux: float = 1 / 32  # topk: weight of the auxiliary loss that revives dead latents
    dead_steps: int = 50  # a latent silent for this many steps counts as dead
    buffer_rows: int = 65536
    seed: int = 0
    log_every: int = 50


def train_sae(rows: StreamedRows, settings: TrainSettings, on_log=None) -> tuple[SparseAutoencoder, list[dict]]:
    """Train an SAE on the group's rows; returns it (input scale set) and the logged metrics."""
    s = settings
    if s.architecture not in ("topk", "relu"):
        raise UserError("JumpReLU SAEs are read for inference only (`mimic sae import`); train topk or relu"
                        if s.architecture == "jumprelu" else f"--arch must be topk or relu, not '{s.architecture}'")
    if s.steps < 1 or s.batch_size < 1 or s.buffer_rows < 1:
        raise UserError("--steps, --batch-size and --buffer-rows must be at least 1")
    if s.batch_size > rows.rows:
        raise UserError(f"--batch-size {s.batch_size} is larger than the {rows.rows} rows of the group")
    d_in = rows.width
    scale = rows.mean_norm() / math.sqrt(d_in)
    if not scale > 0:
        raise UserError(f"the rows of features '{rows.features.folder}' are all zero")
    sae = SparseAutoencoder(d_in, s.d_sae, s.architecture, s.k, input_scale=scale)
    generator = torch.Generator().manual_seed(s.seed)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(s.d_sae, d_in, generator=generator))
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
        sae.W_enc.copy_(sae.W_dec.T)
    optimiser = torch.optim.Adam(sae.parameters(), lr=s.lr)
    decay_from = int(0.8 * s.steps)  # constant rate, then linear decay to 0 over the last 20 %
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 1.0 if step < decay_from else max(0.0, (s.steps - step) / (s.steps - decay_from)))
    silent = torch.zeros(s.d_sae, dtype=torch.long)  # steps since each latent last fired
    log, sums = [], torch.zeros(3)
    for step, batch in enumerate(rows.batches(s.batch_size, s.buffer_rows, s.seed), 1):
        x = batch / scale
        if step == 1:
            with torch.no_grad():
                sae.b_dec.copy_(x.mean(0))
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        z = sae.activate(pre)
        recon = z @ sae.W_dec + sae.b_dec
        error = (recon - x).pow(2).sum(-1)
        fired = (z > 0).any(0)
        silent = torch.where(fired, 0, silent + 1)
        loss = error.mean()
        if s.architecture == "topk":
            loss = loss + s.aux * _aux_loss(sae, x - recon.detach(), pre, silent > s.dead_steps, d_in)
        else:
            loss = loss + s.l1 * (z * sae.W_dec.norm(dim=1)).sum(-1).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if s.architecture == "topk":
            sae.normalise_decoder()
        with torch.no_grad():
            variance = (x - x.mean(0)).pow(2).sum(-1).mean()
            sums += torch.stack([loss.detach(), error.mean().detach() / variance, (z > 0).sum(-1).float().mean()])
        if step % s.log_every == 0 or step == s.steps:
            count = (step - 1) % s.log_every + 1
            loss_mean, fvu, l0 = (sums / count).tolist()
            entry = {"step": step, "loss": round(loss_mean, 6), "fvu": round(fvu, 6), "l0": round(l0, 3),
                     "dead": int((silent > s.dead_steps).sum())}
            log.append(entry)
            if on_log:
                on_log(entry)
            sums.zero_()
        if step == s.steps:
            break
    return sae.requires_grad_(False), log


def _aux_loss(sae, residual, pre, dead, d_in):
    """Reconstruct the main loss's residual from the dead latents' top k_aux pre-activations
    (k_aux = d_in / 2, as in Gao et al. 2024), normalised by the residual's variance: their
    gradient moves dead latents towards what the live ones miss. Unlike Gao et al., negative
    pre-activations are kept (a latent that never fires has only those, and a ReLU would give it
    no gradient). Zero while none is dead."""
    k_aux = min(d_in // 2, sae.d_sae)
    masked = pre.masked_fill(~dead, -torch.inf)
    top = masked.topk(k_aux, dim=-1)
    values = torch.where(torch.isfinite(top.values), top.values, 0)  # no ReLU: below-zero latents learn too
    z_aux = torch.zeros_like(pre).scatter(-1, top.indices, values)
    error = (z_aux @ sae.W_dec - residual).pow(2).sum(-1).mean()
    variance = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
    return torch.where(dead.any(), error / variance, 0)


# -- evaluation ----------------------------------------------------------------------------------------
DENSE_FRACTION = 0.10  # a latent firing on more rows than this is dense


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, rows: StreamedRows) -> dict:
    """Reconstruction and sparsity on every row of the group, accumulated in fp64:
    FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (predicting the mean gives 1, a perfect
    reconstruction 0), explained variance = 1 - FVU, mean cosine, L0 (count and fraction of the
    width), dead latents (never fire) and dense ones (fire on > 10 % of rows)."""
    if rows.width != sae.d_in:
        raise UserError(f"the SAE reads width {sae.d_in}; features '{rows.features.folder}' have {rows.width}")
    n, sq_error, sq_sum, cosine, l0 = 0, 0.0, 0.0, 0.0, 0.0
    total = torch.zeros(sae.d_in, dtype=torch.float64)
    fires = torch.zeros(sae.d_sae, dtype=torch.float64)
    for number in range(len(rows.selected)):
        x = rows.shard(number)
        if not len(x):
            continue
        z = sae.encode(x)
        recon = sae.decode(z)
        sq_error += float((recon - x).double().pow(2).sum())
        sq_sum += float(x.double().pow(2).sum())
        total += x.double().sum(0)
        cosine += float(torch.nn.functional.cosine_similarity(recon, x, dim=-1).double().sum())
        active = z != 0
        l0 += float(active.sum())
        fires += active.sum(0).double()
        n += len(x)
    variance = sq_sum - float(total.pow(2).sum()) / n  # sum ||x - mean||^2
    fvu = sq_error / variance if variance > 0 else float("nan")
    return {"rows": n, "fvu": fvu, "explained_variance": 1 - fvu, "cosine": cosine / n, "l0": l0 / n,
            "active_fraction": l0 / n / sae.d_sae, "dead": int((fires == 0).sum()),
            "dead_fraction": float((fires == 0).double().mean()), "dense": int((fires > DENSE_FRACTION * n).sum())}


# -- sparse codes ----------------------------------------------------------------------------------------
@torch.no_grad()
def write_codes(sae: SparseAutoencoder, rows: StreamedRows, folder: Path, count: int) -> None:
    """The group's codes as a features-layout folder: one codes shard per features shard with
    `indices` [rows, count] int32 and `values` [rows, count] (the largest codes of each row), and
    the features' index with each sample's rows and positions narrowed to the group."""
    from safetensors.torch import save_file

    folder.mkdir()
    entries, shards = [], []
    for number in range(len(rows.selected)):
        x = rows.shard(number)
        name = f"shard-{number:05d}.safetensors"
        indices, values = top_codes(sae.encode(x), count) if len(x) else (torch.zeros(0, count, dtype=torch.int32),
                                                                          torch.zeros(0, count))
        save_file({"indices": indices.contiguous(), "values": values.contiguous()}, str(folder / name),
                  metadata={"format": CODES_FORMAT})
        shards.append(name)
        start = 0
        for sample, offsets in rows.samples[number]:
            if not offsets:
                continue
            entry = dict(rows.features.index[sample])
            if isinstance(entry.get("positions"), list) and len(entry["positions"]) == entry["rows"][1] - entry["rows"][0]:
                entry["positions"] = [entry["positions"][o] for o in offsets]
            entry.update(shard=number, rows=[start, start + len(offsets)])
            start += len(offsets)
            entries.append(entry)
    meta = {**rows.features.meta, "format": CODES_FORMAT, "features": str(rows.features.folder), "tokens": rows.group,
            "d_sae": sae.d_sae, "codes_per_row": count, "samples": len(entries), "rows": rows.rows, "shards": shards}
    (folder / "index.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))


# -- an SAE folder ---------------------------------------------------------------------------------------
def features_hash(features: Features) -> str:
    """What the SAE was trained on: the features' meta.json and index.jsonl, hashed."""
    import hashlib

    digest = hashlib.sha256()
    for name in ("meta.json", "index.jsonl"):
        digest.update((features.folder / name).read_bytes())
    return digest.hexdigest()[:16]


def train_to_folder(features: Features, group: str, settings: TrainSettings, out, *, codes_per_row: int | None = None,
                    on_log=None) -> Path:
    """Train on the group's rows (streamed) and write the SAE folder `out`: the SAE in SAELens's
    layout, metrics.jsonl, evaluation.json (on the training rows), report.html and `codes/`."""
    from .atomic import atomic_folder, refuse_existing
    from .sae import save_sae
    from .sae_report import sae_page

    out = Path(out)
    refuse_existing(out, "--out")
    rows = StreamedRows(features, group)
    sae, log = train_sae(rows, settings, on_log)
    mimic = {key: features.meta[key] for key in ("model", "checkpoint", "revision", "site")}
    mimic.update(tokens=group, features=str(features.folder), features_sha256=features_hash(features),
                 architecture=settings.architecture, steps=settings.steps, batch_size=settings.batch_size,
                 lr=settings.lr, seed=settings.seed, **({"l1": settings.l1} if settings.architecture == "relu" else
                                                        {"aux": settings.aux, "dead_steps": settings.dead_steps}))
    evaluation = {group: evaluate_sae(sae, rows)}
    with atomic_folder(out) as folder:
        save_sae(sae, folder, mimic)
        (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))
        (folder / "evaluation.json").write_text(json.dumps(evaluation, indent=2))
        cfg = json.loads((folder / "cfg.json").read_text())
        (folder / "report.html").write_text(sae_page(cfg, log, evaluation), encoding="utf-8")
        write_codes(sae, rows, folder / "codes", codes_per_row or settings.k or 32)
    return out
