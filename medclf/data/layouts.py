"""Public datasets' folder layouts, normalised so that they train as they come.

- Wrappers an archive adds (`archive/chest_xray/...`, `COVID-19_Radiography_Dataset/...`) are walked through:
  `dataset_root` descends while a folder holds nothing but one sub-folder that itself holds folders.
- Folders that hold no training images are never read (`sources.is_skipped_folder`): segmentation masks
  (the COVID-19 Radiography Database keeps `masks/` beside each class's `images/`), `__MACOSX` and hidden folders.
  Files other than images (metadata spreadsheets, READMEs) are ignored as everywhere.
- A given validation split too small to select on (the Kaggle Kermany set's `val/` has 16 images) is replaced by
  one carved from train+val, grouped by patient where the names carry patients (`resplit_small_val`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import splits
from .sources import SPLIT_NAMES, Source, Split, _subset, is_image_file, is_skipped_folder, notice

# a given val split below this many images is too small to select on: 95% CI of an accuracy near 0.9 is ±0.08 ...
TINY_VAL = 50
# ... and it is replaced only when carving val_fraction of train+val gives at least this many times more images
RESPLIT_GAIN = 4


def _subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not is_skipped_folder(d.name))


def dataset_root(folder: Path) -> Path:
    """The folder holding the splits or classes inside the wrapper folders an archive adds."""
    current = folder
    while not any((current / s).is_dir() for s in SPLIT_NAMES):
        children = _subfolders(current)
        has_images = any(p.is_file() and is_image_file(p) for p in current.iterdir())
        if len(children) != 1 or has_images or not _subfolders(children[0]):
            break  # a single class folder (or a folder of images) is data, not a wrapper
        current = children[0]
    if current != folder:
        notice(f"reading {current} (the only data folder inside {folder})")
    return current


def _pool(train: Split, val: Split) -> Split:
    groups = train.groups + val.groups if train.groups is not None and val.groups is not None else None
    return Split(labels=np.concatenate([train.labels, val.labels]), paths=train.paths + val.paths, groups=groups)


def resplit_small_val(source: Source, val_fraction: float, seed: int) -> None:
    """Replace a given val split of folder data that is too small to select on (< TINY_VAL images) by
    `val_fraction` of train+val, every patient on one side where patients are known (Split.groups, or Kermany
    file names); the images of the old val join the pool, so none are lost."""
    if val_fraction <= 0 or "train" not in source.splits or "val" not in source.splits:
        return
    train, val = source.splits["train"], source.splits["val"]
    if train.paths is None or val.paths is None or len(val) >= TINY_VAL:
        return
    if val_fraction * (len(train) + len(val)) < RESPLIT_GAIN * max(1, len(val)):
        return  # re-splitting would not give a meaningfully larger validation split
    pool = _pool(train, val)
    grouped = pool.groups is not None and len(set(pool.groups)) >= 2
    parts = splits.stratified_split(pool.labels, val_fraction, 0.0, seed, groups=pool.groups if grouped else None)
    kept, held = parts["train"], parts["val"]
    how = (f"grouped by patient ({len({pool.groups[i] for i in held})} of {len(set(pool.groups))} patients)"
           if grouped else "stratified (no patient ids known)")
    source.splits["train"], source.splits["val"] = _subset(pool, kept), _subset(pool, held)
    why = (f"the given val has {len(val)} images (< {TINY_VAL}), too few to select on: val re-split as "
           f"{len(held)}/{len(pool)} of train+val, {how}, seed {seed}")
    source.generated_splits["val"] = why
    source.generated_splits["train"] = f"train+val less the re-split val ({len(kept)} images)"
    notice(why)
