"""Reproducible stratified splits (scikit-learn), and the split files written to a run."""
from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import MedclfError


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int,
                     groups: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Indices for train/val(/test), stratified by label; classes too small to stratify fall back to random.
    With `groups` every group lands in one split (`grouped_split`).

    Multi-label labels (N×L) are stratified on the label set (each distinct 0/1 row is a stratum); with a
    label set of one image, as usual for many findings, the split is random."""
    if labels.ndim == 2:
        labels = np.unique(labels, axis=0, return_inverse=True)[1].reshape(-1)
    idx = np.arange(len(labels))
    parts: dict[str, np.ndarray] = {}
    held = val_fraction + test_fraction
    if held <= 0:
        return {"train": idx}
    group_array = np.asarray(groups) if groups is not None else None

    def cut(part: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        if group_array is None:
            return _split(part, labels[part], fraction, seed)
        return grouped_split(part, labels[part], group_array[part], fraction, seed)

    train_idx, held_idx = cut(idx, held)
    parts["train"] = train_idx
    if test_fraction > 0 and val_fraction > 0:
        val_idx, test_idx = cut(held_idx, test_fraction / held)
        parts["val"], parts["test"] = val_idx, test_idx
    elif val_fraction > 0:
        parts["val"] = held_idx
    else:
        parts["test"] = held_idx
    return {k: np.sort(v) for k, v in parts.items()}


def _split(idx: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split  # imported where used: slow to import

    n_held = math.ceil(fraction * len(idx))  # how scikit-learn sizes the held-out part
    if n_held >= len(idx):
        raise MedclfError(f"{len(idx)} image(s) are too few to hold out {fraction:.0%} for validation/test; "
                          "add images or give val/test splits")
    counts = np.bincount(labels)
    n_classes = len(counts[counts > 0])
    stratify = labels if counts[counts > 0].min() >= 2 and min(n_held, len(idx) - n_held) >= n_classes else None
    a, b = train_test_split(idx, test_size=fraction, random_state=seed, stratify=stratify)
    return np.asarray(a), np.asarray(b)


def grouped_split(idx: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held) with every group on one side, held about `fraction` of the images.

    scikit-learn's StratifiedGroupKFold with round(1/fraction) folds, one fold held out (so the fraction is
    rounded to 1/k: 0.1, 0.125, 0.2, 0.25, 1/3, 0.5); with fewer groups than folds, GroupShuffleSplit
    (grouped, not stratified)."""
    import warnings

    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold  # slow to import: only here

    n_groups = len(set(groups.tolist()))
    if n_groups < 2:
        raise MedclfError(f"{len(idx)} image(s) from {n_groups} patient/group cannot be split into train and "
                          "validation/test without a patient on both sides; add patients or give val/test splits")
    k = max(2, round(1 / fraction))
    if n_groups >= k:
        with warnings.catch_warnings():  # "least populated class has fewer members than n_splits": still grouped
            warnings.simplefilter("ignore", UserWarning)
            cutter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
            kept, held = next(cutter.split(np.zeros(len(idx)), labels, groups))
    else:
        kept, held = next(GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
                          .split(np.zeros(len(idx)), labels, groups))
    return idx[kept], idx[held]


def write_split_file(path: Path, split_ids: dict[str, list[str]], split_labels: dict[str, np.ndarray], classes: list[str],
                     split_groups: dict[str, list[str] | None] | None = None) -> None:
    """One row per image: split, id (path or npz row), label name, group (patient; empty where unknown).
    Lets anyone rebuild the split and check that no patient sits in two splits."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "id", "label", "group"])
        for split, ids in split_ids.items():
            groups = (split_groups or {}).get(split) or [""] * len(ids)
            for i, label, group in zip(ids, split_labels[split], groups):
                writer.writerow([split, i, label_text(label, classes), group])


def label_text(label: np.ndarray | int, classes: list[str]) -> str:
    """A label as written in files: the class name, or for multi-label the positive labels joined by "|"."""
    if np.ndim(label) == 1:
        return "|".join(c for c, on in zip(classes, label) if on)
    return classes[label] if label >= 0 else ""


# Kermany et al. (2018) chest X-ray names carry the patient: person1028_bacteria_2959.jpeg, IM-0213-0001.jpeg,
# NORMAL2-IM-1234-0001.jpeg (a few have a further -NNNN suffix for repeat views)
_KERMANY_PATIENT = (re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+\.jpe?g$", re.IGNORECASE),
                    re.compile(r"^((?:NORMAL\d*-)?IM-\d+)(?:-\d+)+\.jpe?g$", re.IGNORECASE))


def patient_groups(paths: Sequence[str | os.PathLike]) -> list[str] | None:
    """The patient of each image from Kermany-style file names, so that splits keep a patient's images together;
    None unless every name matches (other data sets carry no patient in their names)."""
    groups = []
    for p in paths:
        name = Path(p).name
        match = next((m for m in (pattern.match(name) for pattern in _KERMANY_PATIENT) if m), None)
        if match is None:
            return None
        groups.append(match.group(1))
    return groups or None
