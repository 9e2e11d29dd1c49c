"""Self-contained HTML pages: inline CSS, images as base64 PNG data URIs, no scripts, no network.

Text from data (class names, file names, arm names, settings) is HTML: pass it through `esc`.
`table` cells and `img` captions are HTML already; `section` titles, `img` alt texts and
`page` titles are escaped here.

Every number taken from a JSON file is written as
`<span class="num" data-key='["test","accuracy"]' data-value="0.8125">0.812</span>`:
`data-key` is the JSON path, `data-value` the exact JSON value, so a page can be checked
against the file it was made from.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

from .. import atomic

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d232b}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:34px 0 10px;border-bottom:1px solid #d8dde3;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}.sub{color:#5b6673;margin:0 0 18px}
table{border-collapse:collapse;background:#fff;margin:6px 0 12px;font-size:14px}
th,td{border:1px solid #d8dde3;padding:5px 9px;text-align:right}th{background:#eef1f4}
td:first-child,th:first-child,.pairs td:last-child{text-align:left}.num{font-variant-numeric:tabular-nums}
.ci{color:#5b6673;font-size:12px}.sig{color:#b3261e;font-weight:600}.muted{color:#5b6673}
.summary{background:#fff;border-left:4px solid #2f6fd0;padding:12px 16px;line-height:1.55;max-width:900px}
.note{background:#fff8e1;border-left:4px solid #e0a800;padding:8px 12px;max-width:900px}
figure{display:inline-block;margin:6px 10px 10px 0;vertical-align:top}figure img{max-width:100%;background:#fff}
figcaption{font-size:12px;color:#5b6673;max-width:360px}
.row{display:flex;gap:8px;align-items:flex-start}.row figure{flex:1;margin:0}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.card{background:#fff;border:1px solid #d8dde3;padding:6px;font-size:12px}
.card img{width:150px;height:150px;image-rendering:auto;display:inline-block}
.thumb{width:96px;height:96px;margin:2px;border:1px solid #d8dde3}
pre{background:#fff;border:1px solid #d8dde3;padding:10px;font-size:12px;overflow:auto;max-height:420px}
"""


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure_uri(fig, dpi: int = 80) -> str:
    """A matplotlib Figure as a PNG data URI."""
    from .figures import png_bytes

    return png_uri(png_bytes(fig, dpi))


def array_uri(image: np.ndarray, min_side: int = 0) -> str:
    """A uint8 H×W, H×W×1, H×W×3 or C×H×W image as a PNG data URI, upscaled (nearest) to at least min_side."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = image.transpose(1, 2, 0)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    pil = Image.fromarray(np.ascontiguousarray(image))
    if min_side and min(pil.size) < min_side:
        factor = math.ceil(min_side / min(pil.size))
        pil = pil.resize((pil.size[0] * factor, pil.size[1] * factor), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return png_uri(buffer.getvalue())


def img(uri: str, alt: str, cls: str = "", caption: str = "") -> str:
    tag = f'<img src="{uri}" alt="{esc(alt)}"' + (f' class="{cls}"' if cls else "") + ">"
    return f"<figure>{tag}<figcaption>{caption}</figcaption></figure>" if caption else tag


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}"


def num(value: float | None, key: list | None = None, digits: int = 3) -> str:
    """A number; with `key` (its JSON path) it carries data-key and the exact data-value."""
    if value is not None and isinstance(value, float) and not math.isfinite(value):
        value = None
    attrs = ""
    if key is not None:
        attrs = f" data-key='{esc(json.dumps(key))}' data-value='{esc(json.dumps(value))}'"
    return f'<span class="num"{attrs}>{fmt(value, digits)}</span>'


def ci(interval) -> str:
    if interval is None or any(v is None or not math.isfinite(v) for v in interval):
        return '<span class="ci">(CI —)</span>'
    return f'<span class="ci">({interval[0]:.3f} to {interval[1]:.3f})</span>'


def pvalue(p: float | None) -> str:
    if p is None or not math.isfinite(p):
        return "—"
    return "&lt; 0.001" if p < 0.001 else f"{p:.3f}"


def table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells are HTML already (escape text with esc())."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def section(title: str, body: str, anchor: str = "") -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def page(title: str, subtitle: str, sections: list[str]) -> str:
    stamp = f"made by medclf on {datetime.now():%Y-%m-%d %H:%M}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body><main><h1>{esc(title)}</h1><p class=\"sub\">{subtitle} · {stamp}</p>"
            + "\n".join(sections) + "</main></body></html>\n")


def write(path: Path, text: str) -> Path:
    """Write atomically, so a reader never sees half a page."""
    return atomic.write_text(path, text)
