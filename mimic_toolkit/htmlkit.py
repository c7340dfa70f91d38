"""The pieces of the toolkit's HTML pages (run report, sweep index, comparison, concepts): one
stylesheet, images embedded as data URIs so that a page opens on its own, and escaping in one
place. Every helper returns `Html`, which the others insert as it is; any other value is text."""
from __future__ import annotations

import base64
import html

# The toolkit's images are small (often a few dozen pixels): show their pixels, do not blur them.
STYLE = ("body{font-family:system-ui,sans-serif;margin:24px;max-width:1100px;color:#222}"
         "img{image-rendering:pixelated;margin:2px}table{border-collapse:collapse;margin:8px 0}"
         "th,td{padding:3px 8px;border:1px solid #ddd;text-align:left;font-size:13px}.kv th{font-weight:600}"
         "figure{display:inline-block;margin:4px;text-align:center}figcaption{font-size:11px}"
         ".row{display:flex;flex-wrap:wrap;gap:8px}.words{font-size:1.1em}"
         ".card{border:1px solid #ccc;border-radius:6px;padding:8px 16px;margin:16px 0}.error{color:#a00}")


class Html(str):
    """Markup, inserted unescaped."""


def text(value) -> Html:
    return value if isinstance(value, Html) else Html(html.escape(str(value)))


def page(title: str, *parts) -> str:
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{text(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(text(p) for p in parts)}</body></html>")


def heading(content, level: int = 1) -> Html:
    return Html(f"<h{level}>{text(content)}</h{level}>")


def paragraph(content, css_class: str = "") -> Html:
    return Html(f"<p{_class(css_class)}>{text(content)}</p>")


def span(content, css_class: str) -> Html:
    return Html(f"<span{_class(css_class)}>{text(content)}</span>")


def block(*parts, css_class: str) -> Html:
    """A <div> of the given class: `row` lays its parts side by side, `card` frames them."""
    return Html(f"<div{_class(css_class)}>{''.join(text(p) for p in parts)}</div>")


def image(source: bytes | str, *, width: int | None = None, alt: str = "") -> Html:
    """PNG bytes are embedded in the page; a string is an address relative to the page."""
    if isinstance(source, bytes):
        source = "data:image/png;base64," + base64.b64encode(source).decode()
    size = f" width={width}" if width else ""
    return Html(f"<img src='{text(source)}'{size} alt='{text(alt)}'>")


def figure(content, caption) -> Html:
    return Html(f"<figure>{text(content)}<figcaption>{text(caption)}</figcaption></figure>")


def link(address: str, content) -> Html:
    return Html(f"<a href='{text(address)}'>{text(content)}</a>")


def table(header: list | None, rows: list, *, row_headers: bool = False, css_class: str = "") -> Html:
    """`row_headers` makes each row's first cell a header. A row shorter than the header ends in a
    cell that spans the rest (one message across the row)."""
    width = len(header) if header else 0
    lines = ["<tr>" + "".join(f"<th>{text(h)}</th>" for h in header) + "</tr>"] if header else []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            tag = "th" if row_headers and i == 0 else "td"
            span_rest = f" colspan={width - i}" if i == len(row) - 1 and len(row) < width else ""
            cells.append(f"<{tag}{span_rest}>{text(cell)}</{tag}>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    return Html(f"<table{_class(css_class)}>{''.join(lines)}</table>")


def facts(items: dict) -> Html:
    """Names and their values, one a line."""
    return table(None, list(items.items()), row_headers=True, css_class="kv")


def _class(css_class: str) -> str:
    return f" class={css_class}" if css_class else ""
