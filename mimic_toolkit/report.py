"""A self-contained report.html for a run folder: images embedded, loss curves as inline SVG,
the P(target) table. Opens with a double click; needs no server and no internet."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

CURVE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#e377c2")


def write_report(folder: str | Path) -> Path:
    folder = Path(folder)
    rows = _metrics(folder)
    manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").is_file() else {}
    concept = manifest.get("concept", {})
    title = f"{manifest.get('model', '?')}: {concept.get('target', '')}"
    parts = [f"<h1>{html.escape(title)}</h1>", _summary(manifest, rows)]
    finals = sorted((folder / "images").glob("*.png"))
    parts.append("<h2>Final images</h2><div class=row>" + "".join(_img(p, 224) for p in finals) + "</div>")
    grids = sorted((folder / "grids").glob("*.png"))
    if grids:
        parts.append("<h2>During the run</h2>" + "".join(
            f"<figure>{_img(p)}<figcaption>{html.escape(p.stem)}</figcaption></figure>" for p in grids))
    if rows:
        parts.append("<h2>Loss terms (unscaled, log scale)</h2>" + _curves(rows))
        parts.append("<h2>P(target) per token</h2>" + _p_table(rows))
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
    path = folder / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        path = next(iter(sorted(folder.glob("metrics*.jsonl"))), None)
    if path is None:
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _summary(manifest: dict, rows: list[dict]) -> str:
    concept = manifest.get("concept", {})
    timings = manifest.get("timings", [])
    ms = timings[-1]["ms_per_step"] if timings else None
    last = rows[-1] if rows else {}
    items = {
        "concept": f"{concept.get('class_name', '')} (class {concept.get('class_index', '')})",
        "target": concept.get("target", ""), "steps": last.get("step", ""),
        "P(answer) at the end": f"{last['p_answer']:.4f}" if "p_answer" in last else "",
        "time per step": f"{ms} ms" if ms is not None else "", "seed": manifest.get("seed", ""),
        "device": f"{manifest.get('device', '')} {manifest.get('device_name', '')}",
        "checkpoint": manifest.get("checkpoint", ""),
        "versions": ", ".join(f"{k} {v}" for k, v in manifest.get("packages", {}).items()),
        "git commit": manifest.get("git_commit") or "-",
    }
    return "<table class=kv>" + "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items.items()) + "</table>"


def _img(path: Path, width: int | None = None) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    style = f" width={width}" if width else ""
    return f"<img src='data:image/png;base64,{data}'{style} alt='{html.escape(path.name)}'>"


def _curves(rows: list[dict], width: int = 640, height: int = 240) -> str:
    import math

    names = list(rows[0]["terms"]) + ["loss"]
    steps = [r["step"] for r in rows]
    series = {n: [r["terms"].get(n, r.get(n)) if n != "loss" else r["loss"] for r in rows] for n in names}
    values = [math.log10(max(v, 1e-12)) for vs in series.values() for v in vs if v is not None]
    lo, hi = min(values), max(values)
    span_x, span_y = max(steps[-1] - steps[0], 1), max(hi - lo, 1e-9)
    x = lambda s: 40 + (width - 50) * (s - steps[0]) / span_x
    y = lambda v: 10 + (height - 30) * (hi - math.log10(max(v, 1e-12))) / span_y
    lines, legend = [], []
    for i, (name, vs) in enumerate(series.items()):
        colour = CURVE_COLOURS[i % len(CURVE_COLOURS)]
        points = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(steps, vs) if v is not None)
        lines.append(f"<polyline fill=none stroke='{colour}' stroke-width=1.5 points='{points}'/>")
        legend.append(f"<span style='color:{colour}'>&#9632; {html.escape(name)}</span>")
    axis = (f"<text x=2 y=16 font-size=10>1e{hi:.1f}</text><text x=2 y={height - 20} font-size=10>1e{lo:.1f}</text>"
            f"<text x=40 y={height - 4} font-size=10>step {steps[0]}</text>"
            f"<text x={width - 80} y={height - 4} font-size=10>step {steps[-1]}</text>")
    return (f"<svg width={width} height={height} style='border:1px solid #ccc'>{axis}{''.join(lines)}</svg>"
            f"<div>{' '.join(legend)}</div>")


def _p_table(rows: list[dict], max_rows: int = 20) -> str:
    pick = rows if len(rows) <= max_rows else [rows[round(i * (len(rows) - 1) / (max_rows - 1))] for i in range(max_rows)]
    head = "".join(f"<th>token {i}</th>" for i in range(len(rows[0]["p_target"])))
    body = ""
    for r in pick:
        cells = "".join(f"<td title='top-5: {html.escape(str(top))}'>{p:.3f}</td>"
                        for p, top in zip(r["p_target"], r.get("top5", [[]] * len(r["p_target"]))))
        body += f"<tr><td>{r['step']}</td>{cells}<td>{r['p_answer']:.4f}</td></tr>"
    return f"<table class=grid><tr><th>step</th>{head}<th>P(answer)</th></tr>{body}</table>"


_CSS = ("body{font-family:system-ui,sans-serif;margin:24px;max-width:1100px}img{image-rendering:pixelated;"
        "margin:2px}table{border-collapse:collapse;margin:8px 0}th,td{padding:3px 8px;border:1px solid #ddd;"
        "text-align:left;font-size:13px}figure{display:inline-block;margin:4px}figcaption{font-size:11px}")
