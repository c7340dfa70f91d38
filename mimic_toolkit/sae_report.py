"""The HTML pages of `mimic sae`: an SAE folder's report, the layer study's page and the latent
cards, from the toolkit's HTML kit; plots are inline SVG line charts."""
from __future__ import annotations

from .htmlkit import Html, facts, heading, page, table, text

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf")


def line_plot(labels: list[str], series: dict[str, list[float | None]], *, title: str, width: int = 420,
              height: int = 200, low: float | None = None, high: float | None = None) -> Html:
    """One line per series over the categorical x axis `labels` (None: no point)."""
    values = [v for vs in series.values() for v in vs if v is not None]
    lo = min(values + ([low] if low is not None else [])) if values else 0.0
    hi = max(values + ([high] if high is not None else [])) if values else 1.0
    span = (hi - lo) or 1.0
    x = lambda i: 50 + (width - 70) * (i / max(len(labels) - 1, 1))
    y = lambda v: 20 + (height - 50) * (hi - v) / span
    parts = [f"<text x=4 y=12 font-size=11 font-weight=600>{text(title)}</text>",
             f"<text x=4 y={y(hi) + 4:.0f} font-size=10>{hi:.3g}</text>",
             f"<text x=4 y={y(lo) + 4:.0f} font-size=10>{lo:.3g}</text>"]
    parts += [f"<text x={x(i) - 15:.0f} y={height - 8} font-size=10>{text(label)}</text>" for i, label in enumerate(labels)]
    legend = []
    for n, (name, vs) in enumerate(series.items()):
        colour = COLOURS[n % len(COLOURS)]
        points = [(x(i), y(v)) for i, v in enumerate(vs) if v is not None]
        parts.append(f"<polyline fill=none stroke='{colour}' stroke-width=2 points='"
                     + " ".join(f"{a:.1f},{b:.1f}" for a, b in points) + "'/>")
        parts += [f"<circle cx={a:.1f} cy={b:.1f} r=3 fill='{colour}'/>" for a, b in points]
        legend.append(f"<span style='color:{colour}'>&#9632; {text(name)}</span>")
    return Html(f"<figure><svg width={width} height={height} style='border:1px solid #ccc'>{''.join(parts)}</svg>"
                f"<figcaption>{' '.join(legend)}</figcaption></figure>")


def sae_page(cfg: dict, log: list[dict], evaluation: dict) -> str:
    mimic = cfg.get("mimic", {})
    title = f"SAE: {mimic.get('model', '')} {mimic.get('site', '')} ({mimic.get('tokens', '')} tokens)"
    summary = {"architecture": cfg["architecture"], "width": f"{cfg['d_sae']} latents on {cfg['d_in']} inputs",
               "k": cfg.get("k", "-"), **{key: mimic[key] for key in ("features", "features_sha256", "steps", "seed")
                                         if key in mimic}}
    steps = [str(row["step"]) for row in log]
    curves = [line_plot(steps, {name: [row[name] for row in log]}, title=name) for name in ("fvu", "l0", "dead")]
    rows = [[group, f"{m['fvu']:.4f}", f"{m['cosine']:.4f}", f"{m['l0']:.2f}", m["dead"], m["dense"], m["rows"]]
            for group, m in evaluation.items()]
    return page(title, heading(title), facts(summary), heading("Training", 2), *curves,
                heading("On the training rows", 2),
                table(["tokens", "FVU", "cosine", "L0", "dead", "dense (> 10 %)", "rows"], rows))


def get(value, *path):
    """value[path[0]][path[1]]...; None where a step is missing or None."""
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def layers_page(study: dict) -> str:
    """The layer study: a table per site and one plot per measure across the sites (a measure a
    site has not, such as spliced CE before the language model, is left out of its line)."""
    sites, rows = study["sites"], study["rows"]
    title = f"SAEs on visual tokens, layer by layer: {study['model']}"
    summary = {"sites": ", ".join(sites), "token groups": ", ".join(study["groups"]),
               "training images": study["train_samples"], "held-out images": study["test_samples"],
               "labels": ", ".join(study["label_keys"]),
               "SAE": f"{study['settings']['architecture']}, {study['settings']['d_sae']} latents, "
                      f"k {study['settings']['k']}, {study['settings']['steps']} steps"}
    per_group = lambda measure: {g: [get(r, "groups", g, measure) for r in rows] for g in study["groups"]}
    keys = study["label_keys"]
    plots = [line_plot(sites, per_group("fvu"), title="FVU (image-token SAE)", low=0),
             line_plot(sites, per_group("l0"), title="L0", low=0),
             line_plot(sites, per_group("dead_fraction"), title="dead fraction", low=0, high=1),
             line_plot(sites, {"CE recovered": [get(r, "splice", "recovered") for r in rows],
                               "answers unchanged": [get(r, "splice", "unchanged", "sae") for r in rows]},
                       title="spliced at the image positions", low=0, high=1),
             line_plot(sites, {"logit-lens readability": [r["readability"] for r in rows]},
                       title="readability of image tokens", low=0, high=1),
             line_plot(sites, {f"probe {k}": [r["probe"][k] for r in rows] for k in keys},
                       title="linear probe accuracy", low=0, high=1),
             line_plot(sites, {f"purity {k}": [r["purity"][k] for r in rows] for k in keys},
                       title="latent label purity", low=0, high=1),
             line_plot(sites, {name: [get(r, "judge", name) for r in rows] for name in ("match", "shuffled", "difference")},
                       title="exact judge vs shuffled labels", high=1)]
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
    header = ["site", *(f"FVU {g}" for g in study["groups"]), "L0", "dead", "CE clean / SAE / zero", "recovered",
              "unchanged", "readability", *(f"probe {k}" for k in keys), "judge", "shuffled"]
    body = []
    for r in rows:
        ce = get(r, "splice", "ce")
        body.append([r["site"], *(fmt(get(r, "groups", g, "fvu")) for g in study["groups"]),
                     fmt(get(r, "groups", "image", "l0")), fmt(get(r, "groups", "image", "dead_fraction")),
                     f"{ce['clean']:.3f} / {ce['sae']:.3f} / {ce['zero']:.3f}" if ce else "-",
                     get(r, "splice", "note") or fmt(get(r, "splice", "recovered")),
                     fmt(get(r, "splice", "unchanged", "sae")), fmt(r["readability"]),
                     *(fmt(r["probe"][k]) for k in keys), fmt(get(r, "judge", "match")), fmt(get(r, "judge", "shuffled"))])
    return page(title, heading(title), facts(summary), table(header, body), heading("Across layers", 2), *plots)
