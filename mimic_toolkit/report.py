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
    parts = [heading(title), _summary(manifest, rows, _settings(folder)), heading("Final images", 2),
             block(*(image(p.read_bytes(), width=224, alt=p.name) for p in finals), css_class="row")]
    grids = sorted((folder / "grids").glob("*.png"))
    if grids:
        parts += [heading("During the run", 2), *(figure(image(p.read_bytes(), alt=p.name), _grid_caption(p))
                                                  for p in grids)]
    if rows:
        parts += [heading("Loss terms (unscaled; each on its own axis)", 2), _curves(rows),
                  heading("P(target) per token", 2), _p_table(rows, manifest.get("target_tokens"))]
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


def _grid_caption(path: Path) -> str:
    """'step_000500.png' -> 'step 500' (and the process, in a multi-process run)."""
    step, _, rank = path.stem.removeprefix("step_").partition(".")
    return f"step {int(step)}" + (f" ({rank})" if rank else "") if step.isdigit() else path.stem


def _settings(folder: Path) -> dict:
    """The run's config.yaml ({} when absent or unreadable: the report still shows the rest)."""
    import yaml

    try:
        settings = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return settings if isinstance(settings, dict) else {}


def _objective(settings: dict, manifest: dict) -> dict:
    scales = settings.get("scales") or {}
    stats = manifest.get("stats") or {}
    on = ", ".join(f"{name} {scale:g}" for name, scale in scales.items() if scale)
    off = ", ".join(name for name, scale in scales.items() if not scale)
    return {
        "objective": settings.get("objective") or "the answer (teacher-forced cross-entropy)",
        "term scales": on + (f" (off: {off})" if off else ""),
        "feature statistics": f"{stats['path']} (sha256 {stats['sha256'][:16]}...)" if stats.get("path") else "none",
    }


def _summary(manifest: dict, rows: list[dict], settings: dict | None = None) -> str:
    concept = manifest.get("concept", {})
    timings = manifest.get("timings", [])
    ms = timings[-1]["ms_per_step"] if timings else None
    last = rows[-1] if rows else {}
    items = {
        "concept": f"{concept.get('class_name', '')} (class {concept.get('class_index', '')})",
        "target": concept.get("target", ""), "steps": last.get("step", ""),
        "P(answer) at the end": f"{last['p_answer']:.4f}" if "p_answer" in last else "",
        "time per step": f"{ms} ms" if ms is not None else "", "seed": manifest.get("seed", ""),
        "device": _device(manifest),
        "checkpoint": manifest.get("checkpoint") or "",
        **_objective(settings or {}, manifest),
        **{f"{name} (on the final images)": verdict for name, verdict in manifest.get("verdicts", {}).items()},
        "versions": ", ".join(f"{k} {v}" for k, v in manifest.get("packages", {}).items()),
        "git commit": manifest.get("git_commit") or "-",
    }
    return facts(items)


def _device(manifest: dict) -> str:
    device, name = manifest.get("device", ""), manifest.get("device_name", "")
    return f"{device} ({name})" if name and name != device else device


def _curves(rows: list[dict]) -> Html:
    """One small plot per term and the scaled sum, each on a linear axis of its own with its values
    marked: terms differ by orders of magnitude and some (the lm objective) are negative."""
    series = {name: [r["terms"].get(name) for r in rows] for name in rows[0]["terms"]}
    series["loss (scaled sum)"] = [r["loss"] for r in rows]
    steps = [r["step"] for r in rows]
    plots = [_plot(name, steps, values, CURVE_COLOURS[i % len(CURVE_COLOURS)])
             for i, (name, values) in enumerate(series.items())]
    return block(*plots, css_class="row")


def _plot(name: str, steps: list[int], values: list, colour: str, width: int = 300, height: int = 150) -> Html:
    known = [(s, v) for s, v in zip(steps, values) if v is not None]
    lo, hi = min(v for _, v in known), max(v for _, v in known)
    span_x, span_y = max(steps[-1] - steps[0], 1), (hi - lo) or 1.0
    left, top, bottom = 56, 18, height - 22
    x = lambda s: left + (width - left - 8) * (s - steps[0]) / span_x
    y = lambda v: bottom - (bottom - top) * (v - lo) / span_y
    points = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in known)
    middle = steps[0] + span_x // 2
    ticks = "".join(f"<text x={left - 4} y={y(v) + 4:.1f} font-size=10 text-anchor=end>{v:.3g}</text>"
                    for v in ((hi, lo) if hi != lo else (hi,)))
    ticks += "".join(f"<text x={x(s):.1f} y={height - 6} font-size=10 text-anchor=middle>{s}</text>"
                     for s in dict.fromkeys((steps[0], middle, steps[-1])))
    frame = f"<rect x={left} y={top} width={width - left - 8} height={bottom - top} fill=none stroke='#ccc'/>"
    return Html(f"<svg width={width} height={height}><text x={left} y=12 font-size=11>{text(name)} "
                f"(x: step)</text>{frame}{ticks}<polyline fill=none stroke='{colour}' stroke-width=1.5 "
                f"points='{points}'/></svg>")


def _p_table(rows: list[dict], tokens: list[str] | None = None, max_rows: int = 20) -> Html:
    """P(target) per token (each column named by its token) at up to `max_rows` steps; hovering a
    value shows that step's top-5 tokens."""
    pick = rows if len(rows) <= max_rows else [rows[round(i * (len(rows) - 1) / (max_rows - 1))] for i in range(max_rows)]
    count = len(rows[0]["p_target"])
    names = tokens if tokens and len(tokens) == count else [f"token {i}" for i in range(count)]
    header = ["step", *(f"P({name})" for name in names), "P(answer)"]
    body = [[r["step"], *(Html(f"<span title='top-5: {text(top)}'>{p:.3f}</span>")
                          for p, top in zip(r["p_target"], r.get("top5", [[]] * len(r["p_target"])))),
             f"{r['p_answer']:.4f}"] for r in pick]
    return table(header, body)
