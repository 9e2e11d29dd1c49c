"""Regenerate medclf's offline demo sample (medclf/demo/pneumoniamnist_demo.npz) from PneumoniaMNIST.

A stratified draw, with a fixed seed, from PneumoniaMNIST's official train+val images (28 px), byte-identical
images dropped first so that no image sits in two splits. Usage:

    python tools/make_demo.py [../shared/datasets/pneumoniamnist_28_trainval.npz [OUT.npz]]
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

SIZES = {"train": 300, "val": 100, "test": 100}
SEED = 0
OUT = Path(__file__).resolve().parent.parent / "medclf" / "demo" / "pneumoniamnist_demo.npz"
DEFAULT_SOURCE = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "pneumoniamnist_28_trainval.npz"


def unique_images(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First occurrence of every distinct image (PneumoniaMNIST's train and val share a few byte-identical ones)."""
    seen, keep = set(), []
    for i, image in enumerate(images):
        digest = hashlib.sha1(image.tobytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            keep.append(i)
    return images[keep], labels[keep]


def draw(images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Stratified, disjoint train/val/test of SIZES from the pool."""
    arrays, rest = {}, np.arange(len(labels))
    for split, n in SIZES.items():
        rest, picked = train_test_split(rest, test_size=n, random_state=SEED, stratify=labels[rest])
        arrays[f"{split}_images"] = images[np.sort(picked)]
        arrays[f"{split}_labels"] = labels[np.sort(picked)].reshape(-1, 1).astype(np.uint8)
    return arrays


def main(source: Path, out: Path = OUT) -> None:
    archive = np.load(source)
    images = np.concatenate([archive["train_images"], archive["val_images"]])
    labels = np.concatenate([archive["train_labels"], archive["val_labels"]]).ravel()
    images, labels = unique_images(images, labels)
    arrays = draw(images, labels)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    counts = {s: np.bincount(arrays[f"{s}_labels"].ravel()).tolist() for s in SIZES}
    print(f"{out}: {out.stat().st_size / 1024:.0f} KiB, images per split [normal, pneumonia]: {counts}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SOURCE, *map(Path, sys.argv[2:3]))
