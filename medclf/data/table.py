"""DATA as a label file: a .csv (or tab-separated .tsv) with one row per image.

Columns, found by name (case, spaces and underscores ignored) unless named by a flag:
path (`--path-col`): path|file|filename|image|Image Index, relative to the file's folder or to `--images DIR`;
label (`--label-col`): label|class|target|Finding Labels;
split (`--split-col`, optional): split|fold, values train, val, test (also training, valid, validation, testing);
group (`--group-col`, optional): patient|patient_id|Patient ID|subject|study|group: the patient or study of the image.
Without a split column the rows are split as class folders are (stratified, grouped by patient).
Errors name the line of the file: a missing image, an empty label, a label that train lacks, a path listed twice.

Multi-label files (several findings per image) come in two shapes: a label column of findings joined by
`|` (`Atelectasis|Effusion`, as ChestX-ray14's Finding Labels), with one value for "no finding"
(`--no-finding`, default `No Finding`); or several 0/1 columns named with `--label-col A,B,C`. A label
column is multi-label when a train cell holds `|` or `--no-finding` is given.
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np

from ..errors import MedclfError
from .groups import find_groups
from .sources import MULTICLASS, MULTILABEL, SPLIT_NAMES, Source, Split, _need_two_classes, set_groups, split_pool

SUFFIXES = {".csv": ",", ".tsv": "\t"}
COLUMN_NAMES = {  # detected spellings, normalised by `_norm`
    "path": ("path", "file", "filename", "image", "imageindex", "imagepath", "filepath"),
    "label": ("label", "class", "target", "findinglabels", "diagnosis"),
    "split": ("split", "fold"),
    "group": ("patient", "patientid", "subject", "subjectid", "study", "studyid", "group"),
}
NO_FINDING = "No Finding"  # ChestX-ray14's spelling of an image without findings
SPLIT_VALUES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                "test": "test", "testing": "test"}


def is_table(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES and path.is_file()


def flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).lower()


def read_table(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, cells)]) of a label file; blank lines skipped."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: the byte-order mark spreadsheets write
            reader = csv.reader(f, delimiter=SUFFIXES[path.suffix.lower()])
            header = next(reader, None)
            rows = [(reader.line_num, cells) for cells in reader if any(c.strip() for c in cells)]
    except UnicodeDecodeError:
        raise MedclfError(f"cannot read {path}: not UTF-8 text") from None
    except OSError as exc:
        raise MedclfError(f"cannot read {path}: {exc.strerror or exc}") from None
    except csv.Error as exc:
        raise MedclfError(f"cannot read {path} as {path.suffix[1:].upper()}: {exc}") from None
    if not header or not rows:
        raise MedclfError(f"{path} has no {'rows' if header else 'header line'}; expected a header line "
                          "(e.g. path,label) and one row per image")
    return [h.strip() for h in header], rows


def pick_column(header: list[str], role: str, named: str | None, path: Path, required: bool) -> int | None:
    """The index of the column for role (path, label, split, group): the one named by its flag, else detected."""
    if named is not None:
        if named not in header:
            raise MedclfError(f"{flag(role + '_col')} {named!r}: {path} has no such column "
                              f"(columns: {', '.join(header)})")
        return header.index(named)
    found = [i for i, h in enumerate(header) if _norm(h) in COLUMN_NAMES[role]]
    if len(found) > 1:
        raise MedclfError(f"{path} has several {role} columns ({', '.join(header[i] for i in found)}); "
                          f"name one with {flag(role + '_col')}")
    if not found and required:
        raise MedclfError(f"{path} has no {role} column (columns: {', '.join(header)}); name it with "
                          f"{flag(role + '_col')} or call it {COLUMN_NAMES[role][0]}")
    return found[0] if found else None


def parse_labels(values: list[str], lines: list[int], where: str, classes: list[str] | None = None
                 ) -> tuple[np.ndarray, list[str]]:
    """The one place label cells become class indices: (labels, classes).

    `classes` None: the classes are the sorted distinct values (train's rows); else every value must be one of them.
    """
    cleaned = [v.strip() for v in values]
    for value, line in zip(cleaned, lines):
        if not value:
            raise MedclfError(f"{where} line {line}: empty label")
    if classes is None:
        classes = sorted(set(cleaned))
    index = {c: i for i, c in enumerate(classes)}
    for value, line in zip(cleaned, lines):
        if value not in index:
            raise MedclfError(f"{where} line {line}: label {value!r} never appears in training "
                              f"(classes: {', '.join(classes)})")
    return np.array([index[v] for v in cleaned], dtype=np.int64), classes


def _cell(cells: list[str], column: int | None) -> str:
    return cells[column].strip() if column is not None and column < len(cells) else ""


def _image_path(value: str, base: Path, line: int, where: str, images_given: bool) -> str:
    if not value:
        raise MedclfError(f"{where} line {line}: empty path")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        hint = "" if images_given else " (paths are relative to the label file's folder; --images DIR sets another)"
        raise MedclfError(f"{where} line {line}: image not found: {path}{hint}")
    return os.path.normpath(path)


def _split_of(value: str, line: int, where: str) -> str:
    split = SPLIT_VALUES.get(value.lower())
    if split is None:
        raise MedclfError(f"{where} line {line}: split {value!r} is not one of train, val, test")
    return split


def open_table(path: Path, classes: list[str] | None, seed: int, val_fraction: float, test_fraction: float,
               images: str | None = None, path_col: str | None = None, label_col: str | None = None,
               split_col: str | None = None, group_col: str | None = None, group_pattern: str | None = None,
               no_finding: str | None = None) -> Source:
    """A label file as a Source: its own splits when it has a split column, else split like class folders."""
    where = path.name
    header, rows = read_table(path)
    label_columns = _label_column_names(label_col)
    columns = {role: pick_column(header, role, named, path, required=role in ("path", "label"))
               for role, named in (("path", path_col), ("label", None if label_columns else label_col),
                                   ("split", split_col), ("group", group_col))
               if not (role == "label" and label_columns)}
    if group_pattern and group_col is None:
        columns["group"] = None  # an explicit pattern outranks a detected column
    base = Path(images).expanduser() if images else path.parent
    if images and not base.is_dir():
        raise MedclfError(f"--images {images}: no such folder")
    lines = [line for line, _ in rows]
    paths = [_image_path(_cell(c, columns["path"]), base, line, where, bool(images)) for line, c in rows]
    _refuse_duplicates(paths, lines, where)
    split_names = ([_split_of(_cell(c, columns["split"]), line, where) for line, c in rows]
                   if columns["split"] is not None else ["train"] * len(rows))
    train_rows = [i for i, s in enumerate(split_names) if s == "train"]
    if classes is None and not train_rows:
        raise MedclfError(f"{where} has no train rows; pass a trained model to evaluate its other splits")
    if label_columns:
        labels, classes = parse_label_columns(header, rows, label_columns, path, classes)
        task = MULTILABEL
    else:
        labels_text = [_cell(c, columns["label"]) for _, c in rows]
        task = MULTILABEL if no_finding is not None or any("|" in labels_text[i] for i in train_rows) else MULTICLASS
        parse = parse_label_sets if task == MULTILABEL else parse_labels
        options = {"no_finding": no_finding or NO_FINDING} if task == MULTILABEL else {}
        if classes is None:
            _, classes = parse([labels_text[i] for i in train_rows], [lines[i] for i in train_rows], where, **options)
            if task == MULTICLASS:
                _need_two_classes(classes, path)
        labels, _ = parse(labels_text, lines, where, classes, **options)
    groups = [_cell(c, columns["group"]) or p for (_, c), p in zip(rows, paths)] if columns["group"] is not None else None
    source = Source(path.stem, "folder", path, list(classes))
    source.task = task
    if columns["split"] is None:
        whole = Split(labels=labels, paths=paths, groups=groups)
        if groups is None:
            whole.groups, source.grouping = find_groups(paths, group_pattern)
        else:
            source.grouping = f"column {header[columns['group']]}"
        split_pool(source, whole, where, val_fraction, test_fraction, seed)
        return source
    for name in SPLIT_NAMES:
        rows_of = [i for i, s in enumerate(split_names) if s == name]
        if rows_of:
            source.splits[name] = Split(labels=labels[rows_of], paths=[paths[i] for i in rows_of],
                                        groups=[groups[i] for i in rows_of] if groups is not None else None)
    if groups is None:
        set_groups(source, group_pattern)
    else:
        source.grouping = f"column {header[columns['group']]}"
    return source


def _refuse_duplicates(paths: list[str], lines: list[int], where: str) -> None:
    first: dict[str, int] = {}
    for p, line in zip(paths, lines):
        if p in first:
            raise MedclfError(f"{where} line {line}: image {p} is listed again (first on line {first[p]})")
        first[p] = line


def label_cell(label: np.ndarray | int, classes: list[str]) -> str:
    """A label as a label file writes it: the class name, or the findings joined by "|" (NO_FINDING for none)."""
    from .splits import label_text

    return label_text(label, classes) or NO_FINDING


def _label_column_names(label_col: str | None) -> list[str] | None:
    """`--label-col A,B,C`: several 0/1 label columns (multi-label); None for one label column."""
    if label_col is None or "," not in label_col:
        return None
    return [name.strip() for name in label_col.split(",") if name.strip()]


def parse_label_sets(values: list[str], lines: list[int], where: str, classes: list[str] | None = None,
                     no_finding: str = NO_FINDING) -> tuple[np.ndarray, list[str]]:
    """Multi-label cells (`A|B`, or `no_finding`) as N×L 0/1 over the findings: (labels, labels' names).

    `classes` None: the findings are the sorted distinct ones of these rows; else every finding must be one of them."""
    sets = []
    for value, line in zip(values, lines):
        value = value.strip()
        if not value:
            raise MedclfError(f"{where} line {line}: empty label (an image without findings is {no_finding!r}, "
                              "set by --no-finding)")
        findings = [] if value == no_finding else [f.strip() for f in value.split("|")]
        if not all(findings):
            raise MedclfError(f"{where} line {line}: empty finding in {value!r} (findings are joined by '|')")
        sets.append(findings)
    if classes is None:
        classes = sorted({f for findings in sets for f in findings})
        if not classes:
            raise MedclfError(f"{where}: no train row has a finding (every label is {no_finding!r})")
    index = {c: i for i, c in enumerate(classes)}
    labels = np.zeros((len(sets), len(classes)), dtype=np.int64)
    for row, (findings, line) in enumerate(zip(sets, lines)):
        for f in findings:
            if f not in index:
                raise MedclfError(f"{where} line {line}: finding {f!r} never appears in training "
                                  f"(labels: {', '.join(classes)})")
            labels[row, index[f]] = 1
    return labels, classes


def parse_label_columns(header: list[str], rows: list[tuple[int, list[str]]], names: list[str], path: Path,
                        classes: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Several 0/1 label columns (`--label-col A,B,C`) as N×L labels; the columns name the labels."""
    if classes is not None and names != list(classes):
        raise MedclfError(f"--label-col {','.join(names)}: the model's labels are {','.join(classes)}")
    where = path.name
    index = [pick_column(header, "label", name, path, required=True) for name in names]
    labels = np.zeros((len(rows), len(names)), dtype=np.int64)
    for row, (line, cells) in enumerate(rows):
        for j, column in enumerate(index):
            cell = _cell(cells, column)
            if cell not in ("0", "1", "0.0", "1.0"):
                raise MedclfError(f"{where} line {line}: column {names[j]} holds {cell!r}; label columns hold 0 or 1")
            labels[row, j] = int(float(cell))
    return labels, names
