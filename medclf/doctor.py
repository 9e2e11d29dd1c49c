"""`medclf doctor`: checks a dataset for the problems that silently inflate results, before anyone trusts a number.

Exact duplicates are images whose content hash (SHA-256) is equal: of the file's bytes for image files, of the
row's pixels as uint8 (what training reads) for .npz data. Near-duplicates are pairs whose perceptual hash
(`imagehash.phash`, 64 bits) lies within `NEAR_HASH_DISTANCE` bits and whose 64 px grayscale decodings differ
by at most `NEAR_PIXEL_DIFFERENCE` grey levels on average (the hash finds candidates fast; the pixel check keeps
small images, whose hashes are coarse, from pairing look-alikes). Both are reported within a split and across
splits, the same patient (group) in two splits, one image under two labels, unreadable files, class counts,
size/aspect/channel/bit-depth outliers (from the original files' headers) and nearly constant images.

`brief` is the cheap subset `train` runs at its start: exact duplicates across splits and group overlap.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .data import npz
from .data.sources import Source, Split, notice, open_source
from .errors import MedclfError

THUMB_SIDE = 64  # decoded side used for the perceptual hash, the pixel check, blank frames and thumbnails
NEAR_HASH_DISTANCE = 6  # of 64 phash bits
NEAR_PIXEL_DIFFERENCE = 8.0  # mean absolute difference, grey levels of 255, on the THUMB_SIDE grayscale images
BLANK_STD = 2.0  # grey levels: an image whose pixels vary less than this is a blank frame
SIZE_FACTOR = 2.0  # a side more than this factor away from the median side is a size outlier
ASPECT_FACTOR = 1.5  # an aspect ratio more than this factor away from the median ratio is an aspect outlier
PAIRWISE_LIMIT = 100_000  # above this many images near-duplicates are only those with equal hashes
MAX_PAIRS = 10_000  # listed per kind of pair in doctor.json; the summary counts them all
EXACT_METHOD = {"folder": "SHA-256 of each file's bytes", "npz": "SHA-256 of each row's pixels as uint8"}
SUMMARY_WORDS = {"cross_split_exact": "exact duplicate pair(s) across splits",
                 "cross_split_near": "near-duplicate pair(s) across splits",
                 "group_overlap": "patient(s)/group(s) in more than one split",
                 "label_conflicts": "image(s) with conflicting labels",
                 "duplicates_exact": "exact duplicate pair(s) within a split",
                 "duplicates_near": "near-duplicate pair(s) within a split", "unreadable": "unreadable file(s)",
                 "outliers": "size/aspect/channel/bit-depth outlier(s)", "nearly_constant": "nearly constant image(s)"}
BITS = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}


@dataclass
class Images:
    """Every image of every split, flattened: split name, id (path or npz row), label name, index within its split."""

    split: list[str]
    item: list[str]
    label: list[str | None]  # the class; multi-label: the present labels joined by "|"; None where unknown
    index: np.ndarray

    def ref(self, i: int) -> dict:
        return {"split": self.split[i], "item": self.item[i]}


def flatten(source: Source) -> Images:
    names, items, labels, index = [], [], [], []
    for name, split in source.splits.items():
        names += [name] * len(split)
        items += split.ids
        labels += label_names(split.labels, source.classes)
        index.append(np.arange(len(split)))
    return Images(names, items, labels, np.concatenate(index))


def label_names(labels: np.ndarray, classes: list[str]) -> list[str | None]:
    """Each image's label as text: its class (None for -1), or for N×L 0/1 labels the present ones joined by "|"."""
    if labels.ndim == 2:
        return ["|".join(c for c, on in zip(classes, row) if on == 1) for row in labels.tolist()]
    return [classes[k] if k >= 0 else None for k in labels.tolist()]


# ---------------------------------------------------------------- reading: hashes, headers, decoded thumbnails

def _read_file(path: str, headers: bool = True) -> tuple[str | None, dict | None, str | None]:
    """(content hash, header or None, error) of one file, reading it once."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return None, None, f"cannot read {path}: {exc.strerror or exc}"
    header = (image_header(data) or dicom_header(data)) if headers else None
    return hashlib.sha256(data).hexdigest(), header, None


def image_header(data: bytes) -> dict | None:
    """{width, height, channels, bits, mode} from an image file's header (PIL reads no pixels); None if unknown."""
    from .data.store import UNREADABLE

    try:
        with Image.open(io.BytesIO(data)) as img:
            mode, (width, height) = img.mode, img.size
    except UNREADABLE:
        return None
    channels = 3 if mode == "P" else Image.getmodebands(mode)  # a palette maps to colour
    return {"width": width, "height": height, "channels": channels, "bits": BITS.get(mode, 8), "mode": mode}


def dicom_header(data: bytes) -> dict | None:
    """The same facts from a DICOM header (pixels not read), where pydicom is installed; None otherwise."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:
        return None
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        return {"width": int(ds.Columns), "height": int(ds.Rows), "channels": int(ds.get("SamplesPerPixel", 1)),
                "bits": int(ds.get("BitsStored", ds.get("BitsAllocated", 8))),
                "mode": f"DICOM {ds.get('PhotometricInterpretation', '')}".strip()}
    except (InvalidDicomError, AttributeError, KeyError, ValueError, TypeError, EOFError, OSError):
        return None  # not a DICOM, or one without an image: the decoder says why if it cannot read it


def _npz_hashes(source: Source, split: Split) -> list[str]:
    images = npz.to_uint8(np.asarray(source.load_npz()[f"{split.npz_key}_images"][split.rows]),
                          source.pixel_rules.get(split.npz_key, npz.AS_IS))
    return [hashlib.sha256(np.ascontiguousarray(row).tobytes()).hexdigest() for row in images]


def read_files(source: Source, progress: bool = True, headers: bool = True
               ) -> tuple[list[str | None], list[dict | None], dict[int, str]]:
    """Content hash and header (with `headers`) of every image (flattened order), and {flat index: reason} of
    files not readable."""
    if source.kind == "npz":
        hashes = [h for split in source.splits.values() for h in _npz_hashes(source, split)]
        return hashes, [None] * len(hashes), {}
    paths = [p for split in source.splits.values() for p in split.paths]
    threads = min(8, (os.cpu_count() or 1) * 2)  # file reads and hashing release the GIL
    with ThreadPoolExecutor(threads) as pool:
        results = list(tqdm(pool.map(functools.partial(_read_file, headers=headers), paths), total=len(paths), desc="doctor: read", unit="img",
                            leave=False, disable=not progress or len(paths) < 500))
    errors = {i: error for i, (_, _, error) in enumerate(results) if error}
    return [r[0] for r in results], [r[1] for r in results], errors


def decode_thumbnails(source: Source, unreadable: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
    """Every image decoded by the store's decoder as THUMB_SIDE grayscale: (N×S×S uint8, decoded mask);
    adds the files the decoder refuses to `unreadable`."""
    from .data.store import build_store, decode_image

    thumbs, decoded, offset = [], [], 0
    for name, split in source.splits.items():
        store, skipped = build_store(source, name, THUMB_SIDE, 1, skip_bad=True, cache=False, desc=f"doctor {name}")
        kept = np.ones(len(split), bool)
        position = {p: i for i, p in enumerate(split.paths or [])}
        for path in skipped:
            kept[position[path]] = False
            try:
                decode_image(path, 8)
            except MedclfError as exc:
                unreadable.setdefault(offset + position[path], str(exc))
        full = np.zeros((len(split), THUMB_SIDE, THUMB_SIDE), np.uint8)
        full[kept] = np.asarray(store.images)[:, 0]
        thumbs.append(full)
        decoded.append(kept)
        offset += len(split)
    return np.concatenate(thumbs), np.concatenate(decoded)


# ---------------------------------------------------------------- duplicates

def exact_groups(hashes: list[str | None]) -> list[list[int]]:
    """Flat indices of images sharing a content hash, groups of two or more."""
    by_hash = defaultdict(list)
    for i, h in enumerate(hashes):
        if h is not None:
            by_hash[h].append(i)
    return [members for members in by_hash.values() if len(members) > 1]


def exact_pairs(groups: list[list[int]], images: Images) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(within-split, cross-split) pairs: each copy paired with the first copy in its own split and, for a later
    split, with the first copy in each earlier split, so k copies of one image give k-1 pairs per split pair."""
    within, cross = [], []
    for members in groups:
        first_in: dict[str, int] = {}
        for i in members:
            s = images.split[i]
            if s in first_in:
                within.append((first_in[s], i))
            else:
                cross += [(first, i) for first in first_in.values()]
                first_in[s] = i
    return within, cross


def perceptual_hashes(thumbs: np.ndarray, decoded: np.ndarray, progress: bool = True) -> np.ndarray:
    """64-bit phash of each decoded image as uint64 (0 where not decoded)."""
    import imagehash  # imported where used: only the doctor needs it

    out = np.zeros(len(thumbs), np.uint64)
    for i in tqdm(np.flatnonzero(decoded), desc="doctor: hash", unit="img", leave=False,
                  disable=not progress or len(thumbs) < 2000):
        bits = imagehash.phash(Image.fromarray(thumbs[i])).hash.reshape(-1)
        out[i] = np.packbits(bits).view(">u8")[0]
    return out


def near_pairs(phash: np.ndarray, decoded: np.ndarray, thumbs: np.ndarray, hashes: list[str | None]
               ) -> list[tuple[int, int, int]]:
    """(i, j, hash distance) of near-duplicate pairs i < j that are not exact duplicates."""
    idx = np.flatnonzero(decoded)
    candidates = _hash_neighbours(phash[idx])
    found = []
    for a, b, distance in candidates:
        i, j = int(idx[a]), int(idx[b])
        if hashes[i] is not None and hashes[i] == hashes[j]:
            continue
        difference = np.abs(thumbs[i].astype(np.int16) - thumbs[j].astype(np.int16)).mean()
        if difference <= NEAR_PIXEL_DIFFERENCE:
            found.append((i, j, distance))
    return found


def _hash_neighbours(h: np.ndarray) -> list[tuple[int, int, int]]:
    """(a, b, distance) for a < b with Hamming distance at most NEAR_HASH_DISTANCE; equal hashes only when many."""
    if len(h) > PAIRWISE_LIMIT:
        notice(f"{len(h)} images: near-duplicates limited to equal perceptual hashes (pairwise above {PAIRWISE_LIMIT})")
        same = defaultdict(list)
        for a, value in enumerate(h.tolist()):
            same[value].append(a)
        return [(m[0], b, 0) for m in same.values() for b in m[1:]]
    pairs, chunk = [], max(1, 2 ** 24 // max(len(h), 1))  # rows per step: about 128 MB of XORed hashes
    for start in range(0, len(h), chunk):
        distance = np.bitwise_count(h[start:start + chunk, None] ^ h[None, :])
        rows, cols = np.nonzero(distance <= NEAR_HASH_DISTANCE)
        keep = cols > rows + start
        pairs += [(int(a) + start, int(b), int(distance[a, b])) for a, b in zip(rows[keep], cols[keep])]
    return pairs


def pair_findings(pairs, images: Images, kind: str) -> tuple[list[dict], list[dict]]:
    """(within-split, cross-split) findings {"kind", "distance", "a", "b"} of (i, j[, distance]) pairs."""
    within, cross = [], []
    for pair in pairs:
        i, j = pair[0], pair[1]
        finding = {"kind": kind, "distance": int(pair[2]) if len(pair) > 2 else 0, "a": images.ref(i), "b": images.ref(j)}
        (within if images.split[i] == images.split[j] else cross).append(finding)
    return within, cross


# ---------------------------------------------------------------- groups, labels, counts

def split_groups(source: Source) -> dict[str, list[str] | None]:
    """Each split's groups (patients) as opening the data found them (`data/groups.py find_groups`: a label
    file's column, --group-pattern, DICOM tags, Kermany-style file names)."""
    return {name: split.groups for name, split in source.splits.items()}


def group_overlap(source: Source) -> list[dict]:
    """Groups with images in more than one split: {"group", "splits", "images": {split: count}}."""
    per_group: dict[str, Counter] = defaultdict(Counter)
    for name, groups in split_groups(source).items():
        for g in groups or []:
            per_group[g][name] += 1
    return [{"group": g, "splits": [s for s in source.splits if s in counts], "images": dict(counts)}
            for g, counts in sorted(per_group.items()) if len(counts) > 1]


def label_conflicts(groups: list[list[int]], images: Images) -> list[dict]:
    """Exact duplicates that carry different labels."""
    found = []
    for members in groups:
        known = {images.label[i] for i in members if images.label[i] is not None}
        if len(known) > 1:
            found.append({"labels": sorted(known),
                          "items": [{**images.ref(i), "label": images.label[i]} for i in members]})
    return found


def class_counts(source: Source) -> tuple[dict, dict]:
    """({split: {class: images}}, {split: largest / smallest class count, None with a class absent})."""
    counts, imbalance = {}, {}
    for name, split in source.splits.items():
        per_class = (split.labels.clip(0, 1).sum(0) if split.labels.ndim == 2  # multi-label: positives per label
                     else np.bincount(split.labels[split.labels >= 0], minlength=len(source.classes)))
        counts[name] = {c: int(n) for c, n in zip(source.classes, per_class)}
        imbalance[name] = round(float(per_class.max() / per_class.min()), 3) if per_class.min() > 0 else None
    return counts, imbalance


# ---------------------------------------------------------------- outliers and blank frames

def header_outliers(headers: list[dict | None], images: Images) -> list[dict]:
    """Images whose size, aspect ratio, channel count or bit depth stands out from the rest (file headers)."""
    known = [i for i, h in enumerate(headers) if h is not None]
    if len(known) < 3:
        return []
    width = np.array([headers[i]["width"] for i in known], float)
    height = np.array([headers[i]["height"] for i in known], float)
    side, aspect = np.median(np.minimum(width, height)), np.median(width / height)
    bands = [headers[i]["channels"] for i in known]
    bits = [headers[i]["bits"] for i in known]
    channels_usual, bits_usual = Counter(bands).most_common(1)[0][0], Counter(bits).most_common(1)[0][0]
    found = []
    for k, i in enumerate(known):
        w, h = width[k], height[k]
        checks = [("size", f"{int(w)}×{int(h)}", f"short side {side:g}",
                   max(min(w, h) / side, side / min(w, h)) > SIZE_FACTOR),
                  ("aspect", round(w / h, 3), round(float(aspect), 3),
                   max(w / h / aspect, aspect * h / w) > ASPECT_FACTOR),
                  ("channels", bands[k], channels_usual, bands[k] != channels_usual),
                  ("bit_depth", bits[k], bits_usual, bits[k] != bits_usual)]
        found += [{**images.ref(i), "check": check, "value": value, "typical": typical, "mode": headers[i]["mode"]}
                  for check, value, typical, flagged in checks if flagged]
    return found


def nearly_constant(thumbs: np.ndarray, decoded: np.ndarray, images: Images) -> list[dict]:
    std = thumbs.reshape(len(thumbs), -1).std(1)
    return [{**images.ref(i), "std": round(float(std[i]), 3)} for i in np.flatnonzero(decoded & (std < BLANK_STD))]


# ---------------------------------------------------------------- the whole check, the brief one, the verdict

def examine(source: Source, progress: bool = True) -> tuple[dict, np.ndarray, Images]:
    """All findings for source, the decoded thumbnails (flattened order) and the flattened image list."""
    images = flatten(source)
    hashes, headers, unreadable = read_files(source, progress)
    thumbs, decoded = decode_thumbnails(source, unreadable)
    groups = exact_groups(hashes)
    exact_within, exact_cross = pair_findings(sum(exact_pairs(groups, images), []), images, "exact")
    near_within, near_cross = pair_findings(near_pairs(perceptual_hashes(thumbs, decoded, progress), decoded, thumbs,
                                                       hashes), images, "near")
    counts, imbalance = class_counts(source)
    findings = {
        "data": str(source.root), "kind": source.kind, "classes": list(source.classes),
        "splits": {name: {"images": len(split), "generated": _generated(source, name)}
                   for name, split in source.splits.items()},
        "method": method(source),
        "cross_split_duplicates": exact_cross + near_cross[:MAX_PAIRS],
        "duplicates": exact_within + near_within[:MAX_PAIRS],
        "group_overlap": group_overlap(source),
        "groups_known": any(g is not None for g in split_groups(source).values()),
        "label_conflicts": label_conflicts(groups, images),
        "unreadable": [{**images.ref(i), "reason": reason} for i, reason in sorted(unreadable.items())],
        "counts": counts, "imbalance": imbalance,
        "outliers": header_outliers(headers, images),
        "nearly_constant": nearly_constant(thumbs, decoded, images),
    }
    findings["summary"] = summary(findings, {"exact": len(exact_cross), "near": len(near_cross)},
                                  {"exact": len(exact_within), "near": len(near_within)})
    return findings, thumbs, images


def _generated(source: Source, name: str) -> str | None:
    """How medclf made a split the data does not have (class folders without split folders are one split here)."""
    if name not in source.generated_splits:
        return None
    return "all class folders as one split (training splits them at random: duplicates within it can leak)"


def method(source: Source) -> dict:
    return {"exact": EXACT_METHOD.get(source.kind, EXACT_METHOD["folder"]),
            "near": f"imagehash.phash (64 bits) within {NEAR_HASH_DISTANCE} bits and a mean absolute difference of "
                    f"at most {NEAR_PIXEL_DIFFERENCE:g} of 255 between {THUMB_SIDE} px grayscale decodings",
            "nearly_constant": f"pixel standard deviation below {BLANK_STD:g} of 255 ({THUMB_SIDE} px grayscale)"}


def summary(findings: dict, cross: dict, within: dict) -> dict:
    return {"images": sum(s["images"] for s in findings["splits"].values()),
            "cross_split_exact": cross["exact"], "cross_split_near": cross["near"],
            "duplicates_exact": within["exact"], "duplicates_near": within["near"],
            **{key: len(findings[key]) for key in ("group_overlap", "label_conflicts", "unreadable", "outliers",
                                                   "nearly_constant")},
            "leakage": has_leakage(findings)}


def has_leakage(findings: dict) -> bool:
    """What `--strict` fails on: duplicates or a group across splits, or one image under two labels."""
    return bool(findings.get("cross_split_duplicates") or findings.get("group_overlap")
                or findings.get("label_conflicts"))


def brief(source: Source, progress: bool = False, hashes: list[str | None] | None = None) -> dict:
    """The cheap check `train` runs first: exact duplicates across splits and groups in two splits.
    `hashes`: every image's content hash in flattened order, where the caller has them (`store_hashes`); else
    each file is read here."""
    images = flatten(source)
    if hashes is None:
        hashes, _, _ = read_files(source, progress, headers=False)
    _, cross = exact_pairs(exact_groups(hashes), images)
    return {"checks": ["exact cross-split duplicates", "group overlap"], "method": {"exact": method(source)["exact"]},
            "cross_split_duplicates": pair_findings(cross, images, "exact")[1], "group_overlap": group_overlap(source)}


def store_hashes(source: Source, stores: dict) -> list[str | None] | None:
    """The content hashes `read_files` would compute, from the digests the stores took while decoding the same
    files (flattened order; None where a file could not be read); None unless every split's store has them."""
    if source.kind == "npz" or any(getattr(stores.get(name), "digests", None) is None for name in source.splits):
        return None
    return [digest.tobytes().hex() if digest.any() else None
            for name in source.splits for digest in stores[name].digests]


def warn(findings: dict, limit: int = 5, data: str = "DATA") -> None:
    """One warning line per finding, at most `limit`, then one line saying how many more."""
    lines = [f"{d['a']['item']} ({d['a']['split']}) and {d['b']['item']} ({d['b']['split']}) are the same image"
             for d in findings["cross_split_duplicates"]]
    lines += [f"patient/group {g['group']} has images in {' and '.join(g['splits'])}" for g in findings["group_overlap"]]
    for line in lines[:limit]:
        notice(line)
    if len(lines) > limit:
        notice(f"... and {len(lines) - limit} more cross-split finding(s); see `medclf doctor {data}`")


def doctor(data: str | os.PathLike, out: str | os.PathLike | None = "doctor", progress: bool = True,
           **source_options) -> dict:
    """Check DATA; write OUT/doctor.json and OUT/doctor.html (none when out is None) and return the findings.
    Same as `medclf doctor DATA --out OUT`; `has_leakage(findings)` is what `--strict` fails on.
    `source_options` go to `open_source` as they are (e.g. a label file's column names)."""
    import json

    from . import atomic
    from .reporting.doctor_page import write_page

    source = open_source(data, val_fraction=0.0, test_fraction=0.0, **source_options)
    findings, thumbs, images = examine(source, progress)
    if out is not None:
        folder = Path(out)
        if folder.exists() and not folder.is_dir():
            raise MedclfError(f"--out {folder} is a file; give a folder for doctor.json and doctor.html")
        folder.mkdir(parents=True, exist_ok=True)
        atomic.write_text(folder / "doctor.json", json.dumps(findings, indent=2))
        write_page(folder / "doctor.html", findings, thumbs, images)
    return findings


def summary_lines(findings: dict) -> list[str]:
    """What `medclf doctor` prints: one line per kind of finding that is present, and the images checked."""
    s = findings["summary"]
    lines = [f"{s['images']} images in {', '.join(findings['splits'])}"]
    lines += [f"{s[key]} {text}" for key, text in SUMMARY_WORDS.items() if s[key]]
    lines += [f"class imbalance in {split}: largest/smallest class {ratio:g}"
              for split, ratio in findings["imbalance"].items() if ratio is not None and ratio >= 3]
    lines.append("LEAKAGE: images, patients or labels cross splits" if s["leakage"] else "no cross-split leakage found")
    return lines
