"""oof.csv of a `--folds` run: the out-of-fold probabilities, one row per train+val image.

Columns: split, id (as in splits.csv), label (the class name), fold (1..K: the fold that held the image
out), then prob_<class> for every class of the model, in the model's order. The report and compare read
these predictions instead of re-predicting: the run's ensemble has trained on every one of those images.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import atomic
from .errors import MedclfError

OOF_FILE = "oof.csv"
PROB_PREFIX = "prob_"


class OutOfFold(NamedTuple):
    ids: list[tuple[str, str]]  # (split, id) per row
    labels: np.ndarray  # class index per row
    probs: np.ndarray  # N×K
    folds: np.ndarray  # 1..K per row
    classes: list[str]


def write_oof(path: Path, ids: list[tuple[str, str]], labels: np.ndarray, probs: np.ndarray, folds: np.ndarray,
              classes: list[str]) -> Path:
    """Write oof.csv atomically (labels are class indices; they are stored as class names)."""
    with atomic.open_atomic(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "id", "label", "fold"] + [PROB_PREFIX + c for c in classes])
        for (split, ident), label, fold, p in zip(ids, labels, folds, probs):
            writer.writerow([split, ident, classes[label], int(fold)] + [repr(float(v)) for v in p])
    return path


def read_oof(run: str | Path) -> OutOfFold | None:
    """The out-of-fold predictions of RUN (a `--folds` run), or None when it has no oof.csv."""
    path = Path(run) / OOF_FILE
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        rows = list(reader)
    if not header or header[:4] != ["split", "id", "label", "fold"] or len(header) < 6 \
            or not all(h.startswith(PROB_PREFIX) for h in header[4:]):
        raise MedclfError(f"{path} is not an out-of-fold file: expected columns split,id,label,fold,prob_<class>...")
    classes = [h[len(PROB_PREFIX):] for h in header[4:]]
    index = {c: i for i, c in enumerate(classes)}
    try:
        labels = np.array([index[r[2]] for r in rows], dtype=np.int64)
        folds = np.array([int(r[3]) for r in rows], dtype=np.int64)
        probs = np.array([[float(v) for v in r[4:]] for r in rows], dtype=np.float64).reshape(len(rows), len(classes))
    except (KeyError, ValueError, IndexError):
        raise MedclfError(f"{path}: every row needs a known class name as label, a fold number and "
                          f"{len(classes)} probabilities") from None
    if not rows:
        raise MedclfError(f"{path} has no rows")
    return OutOfFold([(r[0], r[1]) for r in rows], labels, probs, folds, classes)
