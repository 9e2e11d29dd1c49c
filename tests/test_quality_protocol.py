"""The pseudo-test protocol of benchmarks/quality.py (carving a test split out of train) and the patient rule it uses."""
from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medclf.data.splits import patient_groups

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_patient_groups_reads_kermany_names():
    paths = ["train/PNEUMONIA/person1028_bacteria_2959.jpeg", "person1028_virus_2960.jpeg", "IM-0213-0001.jpeg",
             "NORMAL2-IM-1234-0001.jpeg", "IM-0496-0001-0002.jpeg", "NORMAL2-IM-0829-0001-0001.jpeg"]
    assert patient_groups(paths) == ["person1028", "person1028", "IM-0213", "NORMAL2-IM-1234", "IM-0496",
                                     "NORMAL2-IM-0829"]


@pytest.mark.parametrize("paths", [["IM-0213-0001.jpeg", "scan_7.png"], ["person12.jpeg"], ["IM-0213.jpeg"], []])
def test_patient_groups_is_none_unless_every_name_matches(paths):
    assert patient_groups(paths) is None


def write_kermany_folder(root: Path, seed: int, patients: int, val: int = 4) -> None:
    """NORMAL (IM-/NORMAL2-IM- names) and PNEUMONIA (person names) with 1 to 3 images per patient, and a val split."""
    rng = np.random.default_rng(seed)
    pixels = Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8))
    for p in range(patients):
        for view in range(1, 1 + int(rng.integers(1, 4))):
            names = {"NORMAL": f"{'NORMAL2-' if p % 2 else ''}IM-{p:04d}-{view:04d}.jpeg",
                     "PNEUMONIA": f"person{p}_{'bacteria' if p % 3 else 'virus'}_{100 * p + view}.jpeg"}
            for label, name in names.items():
                (root / "train" / label).mkdir(parents=True, exist_ok=True)
                pixels.save(root / "train" / label / name)
    for label in ("NORMAL", "PNEUMONIA"):
        (root / "val" / label).mkdir(parents=True, exist_ok=True)
        for i in range(val):
            pixels.save(root / "val" / label / f"{label}-val-{i}.jpeg")


def names(root: Path, split: str) -> set[str]:
    return {f"{p.parent.name}/{p.name}" for p in (root / split).glob("*/*")}


def test_carve_folder_keeps_patients_whole_classes_balanced_and_val_untouched(quality, tmp_path):
    shared = tmp_path / "shared"
    write_kermany_folder(shared, seed=0, patients=40)
    facts = quality.carve_folder(shared, tmp_path / "derived", 0.25, seed=0)
    derived = tmp_path / "derived"
    train, test = names(derived, "train"), names(derived, "test")
    assert train.isdisjoint(test) and train | test == names(shared, "train")
    assert names(derived, "val") == names(shared, "val")
    assert all((derived / "test" / n).resolve().is_file() for n in test)  # links to the shared images
    patients = lambda found: set(patient_groups(sorted(found)))  # noqa: E731
    assert patients(train).isdisjoint(patients(test))
    shared_classes = Counter(n.split("/")[0] for n in names(shared, "train"))
    test_classes = Counter(n.split("/")[0] for n in test)
    for label, n in shared_classes.items():
        assert test_classes[label] / len(test) == pytest.approx(n / sum(shared_classes.values()), abs=0.08)
    assert 0.15 < len(test) / (len(test) + len(train)) < 0.35
    assert facts["grouped"].startswith("by patient") and sum(facts["counts"]["test"].values()) == len(test)


def test_carving_is_deterministic_and_follows_the_carve_seed(quality, tmp_path):
    shared = tmp_path / "shared"
    write_kermany_folder(shared, seed=1, patients=30)
    tests = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        quality.carve_folder(shared, tmp_path / name, 0.2, seed=seed)
        tests[name] = names(tmp_path / name, "test")
    assert tests["a"] == tests["b"]
    assert tests["a"] != tests["c"]


def test_carve_npz_splits_train_only_stratified(quality, tmp_path):
    n = 300
    labels = (np.arange(n) % 10 < 3).astype(np.uint8).reshape(-1, 1)  # 30% class 1
    images = np.zeros((n, 4, 4), np.uint8)
    images[:, 0, 0], images[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256  # each image names its row
    val_images = np.full((20, 4, 4), 7, np.uint8)
    val_labels = (np.arange(20) % 2).astype(np.uint8).reshape(-1, 1)
    shared = tmp_path / "shared.npz"
    np.savez(shared, train_images=images, train_labels=labels, val_images=val_images, val_labels=val_labels)
    quality.carve_npz(shared, tmp_path / "a.npz", 0.2, seed=0)
    quality.carve_npz(shared, tmp_path / "b.npz", 0.2, seed=0)
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert sorted(a.files) == sorted(f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels"))
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(a["val_images"], val_images)
        np.testing.assert_array_equal(a["val_labels"], val_labels)
        rows = {s: a[f"{s}_images"][:, 0, :2].astype(int) @ [1, 256] for s in ("train", "test")}
        assert sorted(np.concatenate([rows["train"], rows["test"]])) == list(range(n))
        np.testing.assert_array_equal(a["test_labels"][:, 0], labels[rows["test"], 0])
        assert len(rows["test"]) == 60 and a["test_labels"].mean() == pytest.approx(0.3)


def test_estimate_coverage_and_the_markdown_table(quality):
    def metrics(test_accuracy: float) -> dict:
        return {"test": {"accuracy": test_accuracy, "auc": 0.95, "balanced_accuracy": 0.9, "f1_macro": 0.9},
                "estimate": {"method": "5-fold cross-validation", "n": 100, "warnings": [],
                             "accuracy": {"value": 0.9, "ci95": [0.85, 0.94]}, "auc": {"value": 0.96, "ci95": [0.9, 0.99]}}}

    inside, outside = quality.estimate_vs_test(metrics(0.92)), quality.estimate_vs_test(metrics(0.80))
    assert inside["accuracy_covered"] is True and outside["accuracy_covered"] is False
    assert inside["auc_covered"] is True and inside["estimate_accuracy_ci95"] == [0.85, 0.94]
    no_estimate = quality.estimate_vs_test({"test": metrics(0.9)["test"]})
    assert no_estimate["accuracy_covered"] is None and no_estimate["test_accuracy"] == 0.9
    rows = [{"dataset": "x", "seed": s, **r} for s, r in enumerate((inside, outside))]
    summary = quality.summarise("x", rows)
    assert summary["accuracy_covered"] == "1/2" and summary["test_accuracy_mean"] == pytest.approx(0.86)
    assert summary["test_accuracy_sd"] == pytest.approx(np.std([0.92, 0.80], ddof=1), abs=1e-4)
    carved = {"x": {"counts": {"train": {"a": 8, "b": 8}, "test": {"a": 2, "b": 2}}, "grouped": "by image"}}
    table = quality.pseudo_test_markdown({"x": rows}, {"x": summary}, carved, 0.2, 0)
    assert "| x | 1 | 5-fold cross-validation | 0.900 [0.850, 0.940] | 0.800 | **no** |" in table
    assert "| x | 2 | 0.900 ± 0.000 | 0.860 ± 0.085 | 1/2 |" in table
    assert quality.machine()["cpu"] in table
