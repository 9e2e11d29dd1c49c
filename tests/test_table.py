"""CSV/TSV label files as DATA, and patient-grouped splits (label-file column, --group-pattern, Kermany names)."""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import FAST_FLAGS, write_class_folders
from medclf.cli import main
from medclf.data import sources, splits
from medclf.data.table import parse_labels
from medclf.errors import MedclfError


def image_rows(root: Path, per_class: int = 12, patients_per_class: int = 6) -> list[dict]:
    """Class folders of tiny PNGs under root/img, as label-file rows with a patient id (two images per patient)."""
    write_class_folders(root / "img", {"NORMAL": per_class, "PNEUMONIA": per_class})
    rows = []
    for label in ("NORMAL", "PNEUMONIA"):
        for i in range(per_class):
            rows.append({"path": f"img/{label}/{label}_{i}.png", "label": label,
                         "patient": f"{label[0]}{i % patients_per_class}"})
    return rows


def write_table(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def group_splits(source: sources.Source) -> dict[str, set[str]]:
    where = defaultdict(set)
    for name, split in source.splits.items():
        for g in split.groups:
            where[g].add(name)
    return where


def test_csv_without_split_column_is_split_grouped_and_stratified(tmp_path):
    table = write_table(tmp_path / "labels.csv", image_rows(tmp_path, per_class=30, patients_per_class=15))
    source = sources.open_source(table, seed=3, val_fraction=0.2, test_fraction=0.2)
    assert source.classes == ["NORMAL", "PNEUMONIA"] and source.grouping == "column patient"
    assert set(source.splits) == {"train", "val", "test"}
    assert sum(len(s) for s in source.splits.values()) == 60
    assert all(len(where) == 1 for where in group_splits(source).values())  # no patient in two splits
    for split in source.splits.values():
        assert set(split.labels.tolist()) == {0, 1}  # stratified: both classes everywhere
    assert "grouped by patient (column patient)" in source.generated_splits["val"]
    assert all(Path(p).is_file() for s in source.splits.values() for p in s.paths)


def test_split_column_tsv_images_dir_and_named_columns(tmp_path):
    rows = [{"File": Path(r["path"]).relative_to("img").as_posix(), "Dx": r["label"], "Set": "train" if i % 4 else "test",
             "Who": r["patient"]} for i, r in enumerate(image_rows(tmp_path))]
    (tmp_path / "meta").mkdir()
    table = write_table(tmp_path / "meta" / "labels.tsv", rows, "\t")
    source = sources.open_source(table, images=str(tmp_path / "img"), label_col="Dx", split_col="Set",
                                 group_col="Who", seed=0)
    assert set(source.splits) == {"train", "test"} and len(source.splits["test"]) == 6
    sources.ensure_val_split(source, 0.25, 0)  # carved from train, grouped by the Who column
    assert set(source.splits) == {"train", "val", "test"}
    train_groups, val_groups = set(source.splits["train"].groups), set(source.splits["val"].groups)
    assert train_groups and val_groups and not train_groups & val_groups


def test_group_pattern_on_file_names_and_kermany_names_in_class_folders(tmp_path):
    rng = np.random.default_rng(0)
    from PIL import Image

    for cls, prefix in (("NORMAL", "IM-0"), ("PNEUMONIA", "person")):
        (tmp_path / "k" / cls).mkdir(parents=True)
        for i in range(20):
            name = f"{prefix}{i // 2}-000{i % 2}.jpeg" if cls == "NORMAL" else f"person{i // 2}_bacteria_{i}.jpeg"
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(tmp_path / "k" / cls / name)
    source = sources.open_source(tmp_path / "k", seed=1)
    assert source.grouping == "Kermany file names"
    assert all(len(where) == 1 for where in group_splits(source).values())
    # an explicit pattern outranks the Kermany names: here the number alone, so IM-03 and person3 are one group
    source = sources.open_source(tmp_path / "k", seed=1, group_pattern=r"^(?:IM-0|person)(\d+)")
    assert source.grouping == r"--group-pattern ^(?:IM-0|person)(\d+)"
    where = group_splits(source)
    assert set(where) == {str(i) for i in range(10)} and all(len(s) == 1 for s in where.values())
    with pytest.raises(MedclfError, match="finds no group in the file name"):
        sources.open_source(tmp_path / "k", group_pattern=r"^nomatch(\d+)")


def test_grouped_split_keeps_groups_and_falls_back_when_groups_are_few():
    labels = np.array([0, 1] * 20)
    groups = np.array([f"g{i // 4}" for i in range(40)])
    kept, held = splits.grouped_split(np.arange(40), labels, groups, 0.25, 0)
    assert not set(groups[kept]) & set(groups[held]) and 8 <= len(held) <= 12  # one of 4 folds of 10 groups
    few = np.array(["a"] * 20 + ["b"] * 20)
    kept, held = splits.grouped_split(np.arange(40), labels, few, 0.1, 0)  # 2 groups < 10 folds
    assert {tuple(set(few[kept])), tuple(set(few[held]))} == {("a",), ("b",)}
    with pytest.raises(MedclfError, match="from 1 patient"):
        splits.grouped_split(np.arange(40), labels, np.array(["a"] * 40), 0.1, 0)


def test_parse_labels_is_the_one_label_parser():
    labels, classes = parse_labels(["b", " a", "b "], [2, 3, 4], "x.csv")
    assert classes == ["a", "b"] and labels.tolist() == [1, 0, 1]
    with pytest.raises(MedclfError, match="x.csv line 3: label 'c' never appears in training"):
        parse_labels(["a", "c"], [2, 3], "x.csv", ["a", "b"])


def test_train_on_csv_records_options_splits_groups_and_reruns_from_config(tmp_path):
    rows = [{"img": r["path"], "Finding Labels": r["label"], "Patient ID": r["patient"]} for r in image_rows(tmp_path)]
    table = write_table(tmp_path / "labels.csv", rows)
    out = tmp_path / "run"
    assert main(["train", str(table), "--path-col", "img", "--no-plan", "--size", "12", *FAST_FLAGS,
                 "--out", str(out)]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["path_col"] == "img" and config["label_col"] is None
    recorded = list(csv.DictReader(open(out / "splits.csv")))
    assert {r["group"] for r in recorded} == {r["Patient ID"] for r in rows}
    where = defaultdict(set)
    for r in recorded:
        where[r["group"]].add(r["split"])
    assert all(len(s) == 1 for s in where.values())
    # the run's config.yaml trains the same data the same way, and evaluate reads the CSV with the run's columns
    assert main(["train", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "splits.csv").read_text() == (out / "splits.csv").read_text()
    assert main(["evaluate", str(out), str(table), "--split", "val"]) == 0
    # predict reads a label file with other column names when told them (as evaluate and train do)
    renamed = write_table(tmp_path / "renamed.csv", [{"file": r["img"], "Finding Labels": r["Finding Labels"],
                                                      "Patient ID": r["Patient ID"]} for r in rows])
    assert main(["predict", str(out), str(table), "--split", "val", "--out", str(tmp_path / "a.csv")]) == 0
    assert main(["predict", str(out), str(renamed), "--split", "val", "--path-col", "file",
                 "--out", str(tmp_path / "b.csv")]) == 0
    first, second = (list(csv.DictReader(open(tmp_path / name))) for name in ("a.csv", "b.csv"))
    assert len(first) > 0 and first == second
    assert main(["predict", str(out), str(renamed), "--path-col", "file"]) == 2  # columns without --split: one line
    from medclf.data import dicom
    from medclf.models import read_checkpoint

    assert read_checkpoint(out)["dicom_mapping"] == dicom.MAPPING  # inference applies the mapping training used


def test_groups_of_follows_store_ids_and_needs_every_id(tmp_path):
    table = write_table(tmp_path / "labels.csv", image_rows(tmp_path))
    source = sources.open_source(table, seed=0)
    train = source.splits["train"]
    ids = list(reversed(train.ids[1:]))  # a store's ids: unreadable files skipped, any order
    assert sources.groups_of(source, ids) == list(reversed(train.groups[1:]))
    assert sources.groups_of(source, ids + ["not/in/the/data.png"]) is None


def test_the_cache_key_changes_with_the_dicom_mapping(tmp_path, monkeypatch):
    from medclf.data import cache, dicom

    table = write_table(tmp_path / "labels.csv", image_rows(tmp_path))
    source = sources.open_source(table, seed=0)
    before = cache.cache_key(source.splits["train"], source, 12, 1)
    assert cache.cache_key(source.splits["train"], source, 12, 1) == before
    monkeypatch.setattr(dicom, "MAPPING", "dicom-v2")
    assert cache.cache_key(source.splits["train"], source, 12, 1) != before


def _rows_with(tmp_path, change) -> Path:
    rows = image_rows(tmp_path)
    rows = [{**r, "split": "train" if i % 3 else "val"} for i, r in enumerate(rows)]
    change(rows)
    return write_table(tmp_path / "labels.csv", rows)


def _missing_file(rows):
    rows[4]["path"] = "img/NORMAL/gone.png"


def _empty_label(rows):
    rows[5]["label"] = " "


def _unseen_label(rows):
    rows[3]["label"] = "COVID"  # row index 3 is a val row (3 % 3 == 0)


def _duplicate(rows):
    rows[7]["path"] = rows[1]["path"]


def _bad_split(rows):
    rows[2]["split"] = "holdout"


@pytest.mark.parametrize("change, flags, message", [
    (_missing_file, [], "labels.csv line 6: image not found: "),
    (_empty_label, [], "labels.csv line 7: empty label"),
    (_unseen_label, [], "labels.csv line 5: label 'COVID' never appears in training (classes: NORMAL, PNEUMONIA)"),
    (_duplicate, [], "labels.csv line 9: image "),
    (_bad_split, [], "labels.csv line 4: split 'holdout' is not one of train, val, test"),
    (lambda rows: None, ["--label-col", "diagnosis"], "--label-col 'diagnosis': "),
    (lambda rows: [r.pop("label") for r in rows], [], "has no label column (columns: path, patient, split)"),
    (lambda rows: None, ["--images", "/nonexistent/folder"], "--images /nonexistent/folder: no such folder"),
    (lambda rows: None, ["--group-pattern", "("], "--group-pattern '(' is no regular expression"),
])
def test_bad_label_files_are_one_line_and_exit_2(tmp_path, capsys, change, flags, message):
    table = _rows_with(tmp_path, change)
    code = main(["train", str(table), "--no-plan", *FAST_FLAGS, "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_table_flags_on_a_folder_are_refused(split_folder, capsys):
    assert main(["plan", str(split_folder), "--label-col", "x", "--out", "-", "--no-probe"]) == 2
    assert "--label-col applies to a CSV/TSV label file" in capsys.readouterr().err


def test_compare_fixes_a_label_files_split_as_a_label_file_keeping_groups(tmp_path):
    from medclf.comparison import fixed_splits

    rows = [{"file": r["path"], "target": r["label"], "subject": r["patient"]} for r in image_rows(tmp_path, 20, 10)]
    table = write_table(tmp_path / "labels.csv", rows)
    used, note = fixed_splits(str(table), tmp_path / "cmp", 0, 0.2, 0.2)
    assert used == str(tmp_path / "cmp" / "data.csv") and "grouped by patient (column subject)" in note
    original = sources.open_source(table, seed=0, val_fraction=0.2, test_fraction=0.2)
    fixed = sources.open_source(used)
    assert not fixed.generated_splits and fixed.grouping == "column group"
    for name, split in original.splits.items():
        assert [str(Path(p).resolve()) for p in split.paths] == fixed.splits[name].paths
        assert split.groups == fixed.splits[name].groups


def test_cross_validation_folds_keep_a_label_files_patients_together(tmp_path, capsys):
    rows = [{**r, "patient": f"x{i // 3}"} for i, r in enumerate(image_rows(tmp_path, per_class=18))]  # not Kermany
    table = write_table(tmp_path / "labels.csv", rows)
    out = tmp_path / "run"
    assert main(["train", str(table), "--no-plan", "--size", "12", "--epochs", "1", "--batch-size", "16",
                 "--patience", "0", "--folds", "2", "--out", str(out)]) == 0
    assert "grouped by patient" in capsys.readouterr().out
    group = {r["id"]: r["group"] for r in csv.DictReader(open(out / "splits.csv"))}
    folds = defaultdict(set)
    for r in csv.DictReader(open(out / "oof.csv")):
        folds[group[r["id"]]].add(r["fold"])
    assert len(folds) >= 4 and all(len(f) == 1 for f in folds.values())


@pytest.mark.parametrize("content, message", [
    (b"path,label\n", "has no rows; expected a header line"),
    (b"\xff\xfe\x00binary", "not UTF-8 text"),
])
def test_empty_or_binary_label_files_are_one_line(tmp_path, capsys, content, message):
    (tmp_path / "labels.csv").write_bytes(content)
    assert main(["plan", str(tmp_path / "labels.csv"), "--out", "-", "--no-probe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_doctor_reads_a_label_file_with_its_columns_and_finds_a_patient_in_two_splits(tmp_path, capsys):
    """`medclf doctor` takes the label-file flags: the named group column puts patient N0 in train and test."""
    rows = image_rows(tmp_path)
    table_rows = [{"File": r["path"], "Dx": r["label"], "Who": r["patient"],
                   "Set": "test" if r["path"].endswith("NORMAL_0.png") else "train"} for r in rows]
    table = write_table(tmp_path / "labels.csv", table_rows)
    argv = ["doctor", str(table), "--out", str(tmp_path / "doc"), "--path-col", "File", "--label-col", "Dx",
            "--group-col", "Who", "--split-col", "Set", "--strict"]
    assert main(argv) == 1
    report = json.loads((tmp_path / "doc" / "doctor.json").read_text())
    assert [g["group"] for g in report["group_overlap"]] == ["N0"]
    assert sorted(report["group_overlap"][0]["splits"]) == ["test", "train"]
