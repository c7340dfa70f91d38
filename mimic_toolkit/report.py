"""A self-contained report.html for a run folder: images embedded, loss curves as inline SVG,
the P(target) table. Opens with a double click; needs no server and no internet."""
from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .htmlkit import Html, block, facts, figure, heading, image, page, table, text
from .jsonfile import read_json_lines

CURVE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#e377c2")


def write_report(folder: str | Path) -> Path:
    folder = Path(folder)
    rows = _metrics(folder)
    manifest = _objects(folder / "manifest.json", whole=True)[0] if (folder / "manifest.json").is_file() else {}
    concept = manifest.get("concept", {})
    title = f"{manifest.get('model', '?')}: {concept.get('target', '')}"
    finals = sorted((folder / "images").glob("*.png"))
    parts = [heading(title), _summary(manifest, rows), heading("Final images", 2),
             block(*(image(p.read_bytes(), width=224, alt=p.name) for p in finals), css_class="row")]
    grids = sorted((folder / "grids").glob("*.png"))
    if grids:
        parts += [heading("During the run", 2), *(figure(image(p.read_bytes(), alt=p.name), p.stem) for p in grids)]
    if rows:
        parts += [heading("Loss terms (unscaled, log scale)", 2), _curves(rows),
                  heading("P(target) per token", 2), _p_table(rows)]
    path = folder / "report.html"
    path.write_text(page(title, *parts), encoding="utf-8")
    return path


def _metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        path = next(iter(sorted(folder.glob("metrics*.jsonl"))), None)
    if path is None:
        return []
    return _objects(path)


def _objects(path: Path, whole: bool = False) -> list[dict]:
    """The JSON objects of a run folder's file; a damaged one is one UserError naming it and the line."""
    values = read_json_lines(path, whole)
    for n, value in enumerate(values, 1):
        if not isinstance(value, dict):
            raise UserError(f"'{path}'{'' if whole else f' line {n}'} is not a JSON object")
    return values


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
    return facts(items)


def _curves(rows: list[dict], width: int = 640, height: int = 240) -> Html:
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
        legend.append(f"<span style='color:{colour}'>&#9632; {text(name)}</span>")
    axis = (f"<text x=2 y=16 font-size=10>1e{hi:.1f}</text><text x=2 y={height - 20} font-size=10>1e{lo:.1f}</text>"
            f"<text x=40 y={height - 4} font-size=10>step {steps[0]}</text>"
            f"<text x={width - 80} y={height - 4} font-size=10>step {steps[-1]}</text>")
    return Html(f"<svg width={width} height={height} style='border:1px solid #ccc'>{axis}{''.join(lines)}</svg>"
                f"<div>{' '.join(legend)}</div>")


def _p_table(rows: list[dict], max_rows: int = 20) -> Html:
    """P(target) per token at up to `max_rows` steps; hovering a value shows that step's top-5 tokens."""
    pick = rows if len(rows) <= max_rows else [rows[round(i * (len(rows) - 1) / (max_rows - 1))] for i in range(max_rows)]
    header = ["step", *(f"token {i}" for i in range(len(rows[0]["p_target"]))), "P(answer)"]
    body = [[r["step"], *(Html(f"<span title='top-5: {text(top)}'>{p:.3f}</span>")
                          for p, top in zip(r["p_target"], r.get("top5", [[]] * len(r["p_target"])))),
             f"{r['p_answer']:.4f}"] for r in pick]
    return table(header, body)
