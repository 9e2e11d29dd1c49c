"""Tiny generated datasets: two or three classes that differ in brightness pattern, learnable in seconds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def make_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Class 0: bright top half; class 1: bright bottom half; class 2: bright centre (flip-invariant); plus noise."""
    img = rng.integers(0, 60, (size, size)).astype(np.uint8)
    half = size // 2
    quarter = size // 4
    if label == 0:
        img[:half, :] += 150
    elif label == 1:
        img[half:, :] += 150
    else:
        img[quarter:size - quarter, quarter:size - quarter] += 150
    return img


def write_class_folders(root: Path, counts: dict[str, int], size: int = 12, seed: int = 0, mode: str = "L") -> Path:
    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            array = make_image(c, size, rng)
            img = Image.fromarray(array, "L")
            if mode != "L":
                img = img.convert(mode)
            img.save(root / name / f"{name}_{i}.png")
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MEDCLF_DATA", str(tmp_path_factory.getbasetemp() / "medclf_data"))


def make_split_folder(root: Path) -> Path:
    write_class_folders(root / "train", {"NORMAL": 24, "PNEUMONIA": 24}, seed=1)
    write_class_folders(root / "val", {"NORMAL": 8, "PNEUMONIA": 8}, seed=2)
    write_class_folders(root / "test", {"NORMAL": 8, "PNEUMONIA": 8}, seed=3)
    return root


@pytest.fixture
def split_folder(tmp_path) -> Path:
    return make_split_folder(tmp_path / "xray")


@pytest.fixture
def npz_file(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 60), ("val", 18), ("test", 18)):
        labels = np.arange(n) % 3
        arrays[f"{split}_images"] = np.stack([make_image(int(l), 16, rng) for l in labels])
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    path = tmp_path / "tiny.npz"
    np.savez(path, **arrays)
    return path


FAST_FLAGS = ["--epochs", "2", "--batch-size", "16", "--patience", "0", "--folds", "0"]


def interrupt_second_epoch(monkeypatch):
    """Make training raise KeyboardInterrupt (Ctrl-C) when its second epoch starts; returns the real epoch function."""
    from medclf import training as train_module

    real = train_module.train_one_epoch
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted)
    return real
