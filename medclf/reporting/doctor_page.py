"""doctor.html: the findings of `medclf doctor` as one self-contained page, duplicates shown as thumbnails.

Every count comes from doctor.json and carries its JSON path (`html.num`), so the page can be checked against it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..doctor import SUMMARY_WORDS
from . import html as H

SHOWN = 40  # pairs (or conflicts, blank frames) shown with thumbnails per section; doctor.json lists them all
ROWS = 200  # table rows per section


def write_page(path: Path, findings: dict, thumbs: np.ndarray, images) -> Path:
    """Write doctor.html; `thumbs` are the decoded grayscale images in the flattened order of `images`."""
    where = {(s, item): i for i, (s, item) in enumerate(zip(images.split, images.item))}

    def thumb(ref: dict) -> str:
        i = where[(ref["split"], ref["item"])]
        return H.img(H.array_uri(thumbs[i], min_side=96), f"{ref['split']}: {ref['item']}", cls="thumb")

    sections = [H.section("Summary", _summary(findings), "summary"),
                H.section("Duplicates across splits", _pairs(findings["cross_split_duplicates"], thumb,
                                                             "No image appears in two splits."), "cross"),
                H.section("Patients (groups) in more than one split", _groups(findings), "groups"),
                H.section("Same image, different labels", _conflicts(findings, thumb), "labels"),
                H.section("Duplicates within a split", _pairs(findings["duplicates"], thumb,
                                                              "No duplicates within a split."), "within"),
                H.section("Class counts", _counts(findings), "counts"),
                H.section("Unreadable files", _rows(["split", "file", "reason"],
                                                    [[r["split"], r["item"], r["reason"]] for r in findings["unreadable"]],
                                                    "Every file was read."), "unreadable"),
                H.section("Size, aspect, channel and bit-depth outliers", _outliers(findings), "outliers"),
                H.section("Nearly constant images", _blank(findings, thumb), "blank"),
                H.section("How the checks work", _method(findings), "method")]
    verdict = "cross-split leakage or label conflicts found" if findings["summary"]["leakage"] else "no leakage found"
    return H.write(path, H.page("medclf doctor", f"{H.esc(findings['data'])} · {verdict}", sections))


def _summary(findings: dict) -> str:
    s = findings["summary"]
    words = {"images": "images", **SUMMARY_WORDS}
    rows = [[H.esc(label), H.num(s[key], ["summary", key], 0)] for key, label in words.items()]
    splits = ", ".join(f"{H.esc(name)} {H.num(info['images'], ['splits', name, 'images'], 0)}"
                       + (f" ({H.esc(info['generated'])})" if info["generated"] else "")
                       for name, info in findings["splits"].items())
    lead = ("<b>Leakage:</b> the same image or patient in two splits, or one image under two labels, makes test "
            "numbers optimistic; fix these before trusting a result." if s["leakage"]
            else "No image, patient or label conflict crosses a split.")
    return f'<p class="summary">{lead}<br>Splits: {splits}.</p>' + H.table(["finding", "count"], rows)


def _caption(ref: dict) -> str:
    return f"{H.esc(ref['split'])}: {H.esc(Path(str(ref['item'])).name)}"


def _gallery(found: list[dict], card, empty: str) -> str:
    """Up to SHOWN findings as thumbnail cards (`card(finding)` is the HTML inside one), or `empty`."""
    if not found:
        return f'<p class="muted">{empty}</p>'
    cards = "".join(f'<div class="card">{card(f)}</div>' for f in found[:SHOWN])
    return f'<div class="gallery">{cards}</div>' + _more(len(found))


def _pairs(pairs: list[dict], thumb, empty: str) -> str:
    return _gallery(pairs, lambda p: f'{thumb(p["a"])}{thumb(p["b"])}<br>{H.esc(p["kind"])}'
                    + (f" (hash distance {p['distance']})" if p["kind"] == "near" else "")
                    + f"<br>{_caption(p['a'])}<br>{_caption(p['b'])}", empty)


def _more(total: int, shown: int = SHOWN) -> str:
    return f'<p class="muted">{total - shown} more in doctor.json.</p>' if total > shown else ""


def _groups(findings: dict) -> str:
    rows = [[H.esc(g["group"]), H.esc(", ".join(g["splits"])),
             H.esc(", ".join(f"{s} {n}" for s, n in g["images"].items()))] for g in findings["group_overlap"]]
    return _rows(["group", "splits", "images per split"], rows,
                 "No patient found in two splits." if findings["groups_known"] else
                 "No patient/group information: neither group ids nor Kermany-style file names.")


def _conflicts(findings: dict, thumb) -> str:
    return _gallery(findings["label_conflicts"], lambda c: "".join(thumb(r) for r in c["items"][:4]) + "<br>"
                    + "<br>".join(f"{_caption(r)} → {H.esc(r['label'])}" for r in c["items"]),
                    "No image carries two labels.")


def _counts(findings: dict) -> str:
    classes = findings["classes"]
    rows = [[H.esc(split)] + [H.num(per[c], ["counts", split, c], 0) for c in classes]
            + [H.num(findings["imbalance"][split], ["imbalance", split], 3)]
            for split, per in findings["counts"].items()]
    return H.table(["split", *map(H.esc, classes), "largest / smallest class"], rows)


def _outliers(findings: dict) -> str:
    rows = [[H.esc(o["split"]), H.esc(o["item"]), H.esc(o["check"]), H.esc(o["value"]), H.esc(o["typical"])]
            for o in findings["outliers"]]
    return _rows(["split", "file", "check", "value", "typical"], rows,
                 "No outliers (or no file headers: .npz data is uniform by construction).")


def _blank(findings: dict, thumb) -> str:
    return _gallery(findings["nearly_constant"], lambda b: f'{thumb(b)}<br>{_caption(b)}<br>std {b["std"]:.2f}',
                    "No nearly constant images.")


def _rows(header: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{empty}</p>'
    return H.table(header, rows[:ROWS]) + _more(len(rows), ROWS)


def _method(findings: dict) -> str:
    items = "".join(f"<li><b>{H.esc(k)}</b>: {H.esc(v)}</li>" for k, v in findings["method"].items())
    return f"<ul>{items}</ul>"
