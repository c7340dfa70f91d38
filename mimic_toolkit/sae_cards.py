"""`mimic sae features`: a card per latent: its density, its grounded words (the decoder
direction unembedded) and the images that activate it most, each with a heatmap of the latent
over the image's patches (the adapter's `image_token_grid`; without a grid, the strongest token
is named instead)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from PIL import Image

from .atomic import atomic_folder, refuse_existing
from .htmlkit import Html, block, facts, figure, heading, image, page, paragraph, span, text
from .lm_capture import Features
from .sae import SparseAutoencoder
from .sae_train import StreamedRows


def heatmap_png(path: str, values: torch.Tensor, grid: tuple[int, int] | None, side: int = 96) -> bytes | None:
    """The image with `values` (one per grid cell, raster order) laid over it in red."""
    try:
        with Image.open(path) as picture:
            picture = picture.convert("RGB").resize((side, side))
    except OSError:
        return None
    if grid is not None:
        rows, cols = grid
        peak = float(values.max())
        strength = (values.reshape(rows, cols) / peak if peak > 0 else torch.zeros(rows, cols)).clamp(0, 1)
        alpha = Image.fromarray((strength.numpy() * 180).astype("uint8"), "L").resize((side, side), Image.NEAREST)
        picture = Image.composite(Image.new("RGB", (side, side), (255, 0, 0)), picture, alpha)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


@torch.no_grad()
def write_cards(sae: SparseAutoencoder, cfg: dict, features: Features, out, *, adapter=None, top: int = 16,
                latents: int = 32) -> Path:
    """Cards for the `latents` densest live latents on the features' image tokens, `top` images
    each; writes `out/index.html` and `out/cards.json`."""
    out = Path(out)
    refuse_existing(out, "--out")
    rows = StreamedRows(features, "image")
    per_sample, fires, total = [], torch.zeros(sae.d_sae), 0
    for number in range(len(rows.selected)):
        codes = sae.encode(rows.shard(number))
        fires += (codes > 0).sum(0)
        total += len(codes)
        start = 0
        for sample, offsets in rows.samples[number]:
            per_sample.append((sample, codes[start:start + len(offsets)]))
            start += len(offsets)
    density = fires / max(total, 1)
    live = [int(i) for i in density.argsort(descending=True) if density[i] > 0][:latents]
    grid = adapter.image_token_grid() if adapter is not None else None
    words = {}
    if adapter is not None:
        from .concepts import ground_words

        grounded = ground_words(adapter, sae.W_dec[live].to(adapter.device),
                                apply_final_norm=features.site != "lm.final_norm", count=8)
        words = dict(zip(live, grounded))
    strongest = torch.stack([codes.amax(0) if len(codes) else torch.zeros(sae.d_sae) for _, codes in per_sample])
    cards, sections = [], []
    for latent in live:
        order = strongest[:, latent].argsort(descending=True)[:top].tolist()
        chosen = [n for n in order if strongest[n, latent] > 0]
        card = {"latent": latent, "density": round(float(density[latent]), 6), "words": words.get(latent, []),
                "top": []}
        thumbs = []
        for n in chosen:
            sample, codes = per_sample[n]
            entry = features.index[sample]
            values = codes[:, latent]
            card["top"].append({"id": entry["id"], "image": entry["image"], "activation": round(float(values.max()), 4),
                                "token": int(values.argmax())})
            cells = None
            if grid is not None and len(values) == grid[0] * grid[1] + grid[2]:
                cells = values[grid[2]:]
            png = heatmap_png(entry["image"], cells if cells is not None else values, grid[:2] if cells is not None else None)
            caption = Html(f"{text(entry['id'])}<br>{float(values.max()):.3g}"
                           + ("" if cells is not None else f" (token {int(values.argmax())})"))
            thumbs.append(figure(image(png, width=96) if png else span(Path(entry["image"]).name, "error"), caption))
        cards.append(card)
        name = Html(f"latent {latent} <small>(fires on {100 * card['density']:.2f} % of image tokens)</small>")
        listed = ", ".join(card["words"]) if card["words"] else Html("<i>no words (--no-words)</i>")
        sections.append(block(heading(name, 3), paragraph(listed, "words"), block(*thumbs, css_class="row"),
                              css_class="card"))
    mimic = cfg.get("mimic") or {}
    summary = {"model": features.model, "site": features.site, "features": str(features.folder),
               "latents": f"{len(live)} shown of {sae.d_sae} ({int((density == 0).sum())} never fire here)",
               "patch grid": f"{grid[0]} x {grid[1]} from token {grid[2]}" if grid else
               "none declared (resampled or merged tokens): the strongest token is named",
               "SAE": f"{cfg['architecture']}, {mimic.get('features', '')}"}
    title = f"SAE latents: {features.model} {features.site}"
    with atomic_folder(out) as folder:
        (folder / "cards.json").write_text(json.dumps({"site": features.site, "cards": cards}, indent=2))
        (folder / "index.html").write_text(page(title, heading(title), facts(summary), *sections), encoding="utf-8")
    return out
