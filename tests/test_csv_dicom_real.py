"""Issue 11's acceptance test on real chest X-rays: a label file with patient ids, half the images as DICOMs of
mixed photometric interpretations and bit depths, two images per patient."""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED
from dicomfiles import KINDS, write_dicom, write_kind
from medclf.cli import main

CHEST = SHARED / "chest_xray_400"
PER_CLASS = 40  # 20 patients of two images per class: small enough to train at full size in seconds


def build_dataset(root: Path) -> tuple[Path, list[tuple[Path, Path]]]:
    """labels.csv over chest X-rays, every other patient's two images as DICOMs; returns it and (original, DICOM)."""
    rows, converted = [], []
    n = 0
    for label in ("NORMAL", "PNEUMONIA"):
        originals = sorted((CHEST / "train" / label).glob("*.jpeg"))[:PER_CLASS]
        for i, original in enumerate(originals):
            patient = f"{label[0]}{i // 2:03d}"
            path = original
            if (i // 2) % 2 == 0:
                pixels = np.asarray(Image.open(original))
                name = original.stem if n % 4 == 3 else original.stem + ".dcm"  # some without an extension
                if pixels.ndim == 3:
                    path = write_dicom(root / "dicom" / name, pixels, "RGB", patient=patient)
                else:
                    path = write_kind(root / "dicom" / name, pixels, KINDS[n % len(KINDS)], patient=patient)
                converted.append((original, path))
                n += 1
            rows.append({"image": str(path), "class": label, "patient_id": patient})
    table = root / "labels.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return table, converted


def prob_columns(path: Path) -> np.ndarray:
    with open(path, newline="") as f:
        return np.array([[float(v) for k, v in row.items() if k.startswith("prob_")] for row in csv.DictReader(f)])


@pytest.mark.slow
@pytest.mark.skipif(not CHEST.is_dir(), reason="../shared/datasets/chest_xray_400 not present")
def test_csv_of_mixed_dicoms_trains_grouped_and_predicts_like_the_originals(tmp_path):
    table, converted = build_dataset(tmp_path)
    assert {Path(d).suffix for _, d in converted} == {"", ".dcm"}
    run = tmp_path / "run"
    # full size (224 px): no resizing, so the DICOMs and the JPEGs reach the model as the same pixels
    assert main(["train", str(table), "--no-plan", "--size", "224", "--channels", "1", "--epochs", "1",
                 "--batch-size", "16", "--patience", "0", "--folds", "0", "--out", str(run)]) == 0
    where = defaultdict(set)
    with open(run / "splits.csv", newline="") as f:
        recorded = list(csv.DictReader(f))
    for row in recorded:
        where[row["group"]].add(row["split"])
    assert len(recorded) == 2 * PER_CLASS and len(where) == PER_CLASS  # every image, two per patient
    assert {s for splits in where.values() for s in splits} == {"train", "val", "test"}
    assert all(len(splits) == 1 for splits in where.values()), "a patient is in two splits"
    originals, dicoms = [str(o) for o, _ in converted], [str(d) for _, d in converted]
    assert main(["predict", str(run), *dicoms, "--out", str(tmp_path / "dicom.csv")]) == 0
    assert main(["predict", str(run), *originals, "--out", str(tmp_path / "jpeg.csv")]) == 0
    from_dicom, from_jpeg = prob_columns(tmp_path / "dicom.csv"), prob_columns(tmp_path / "jpeg.csv")
    assert from_dicom.shape == (len(converted), 2)
    assert from_jpeg[:, 1].std() > 1e-3  # the model tells the images apart: equal probabilities mean equal inputs
    np.testing.assert_allclose(from_dicom, from_jpeg, atol=1e-4)
