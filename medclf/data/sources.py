"""Where images come from: split folders, class folders, CSV/TSV label files, MedMNIST-style .npz files, named datasets.

A `Source` lists, per split, what to decode (file paths or npz rows) and the integer labels;
`store.py` turns it into one uint8 tensor per split.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MedclfError
from . import dicom, named, npz, splits
from .groups import find_groups

KAGGLE_PREFIX = "kaggle:"
MULTICLASS, MULTILABEL = "multi-class", "multi-label"  # Source.task: one label per image, or several (N×L 0/1)
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".ppm"}
SPLIT_NAMES = ("train", "val", "test")
# settings that say how to read DATA beyond its path (TrainConfig fields of the same names; None: detect)
DATA_OPTIONS = ("images", "path_col", "label_col", "split_col", "group_col", "group_pattern", "no_finding")
# sub-folders never read as images: segmentation masks (the COVID-19 Radiography Database keeps masks/ beside each
# class's images/) and macOS archive metadata; hidden folders too
MASK_FOLDERS = {"mask", "masks", "segmentation", "segmentations", "labels"}
SKIPPED_FOLDERS = MASK_FOLDERS | {"__macosx"}


@dataclass
class Split:
    """One split: labels plus either file paths (folders) or row indices into an npz array."""

    labels: np.ndarray  # int64 N, -1 where unknown; multi-label: int64 N×L of 0/1
    paths: list[str] | None = None
    npz_key: str | None = None  # e.g. "train" for train_images
    rows: np.ndarray | None = None
    groups: list[str] | None = None  # patient/study of each image where known: splits keep a group together

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def ids(self) -> list[str]:
        """A stable identifier per image: its path, or its row index in the npz."""
        if self.paths is not None:
            return list(self.paths)
        return [str(int(r)) for r in self.rows]


@dataclass
class Source:
    name: str
    kind: str  # "folder" | "npz"
    root: Path
    classes: list[str]
    splits: dict[str, Split] = field(default_factory=dict)
    generated_splits: dict[str, str] = field(default_factory=dict)  # split -> how it was made
    pixel_rules: dict[str, str] = field(default_factory=dict)  # npz array -> how it becomes uint8 (npz.py)
    task: str = MULTICLASS  # MULTILABEL: labels are N×L 0/1 and `classes` names the L labels
    grouping: str | None = None  # where the splits' groups (patients) came from; None: no groups known
    planned_budget: float | None = None  # minutes the plan uses when none is given (the offline demo's short one)

    def load_npz(self):
        return np.load(self.root, mmap_mode="r")


def is_image_file(path: str | os.PathLike) -> bool:
    """An image by its extension, a .dcm file, or a DICOM named without an image extension (read by its preamble).
    String operations, not Path: listing a folder calls this once per file."""
    name = os.path.basename(path)
    if name.startswith("."):
        return False
    suffix = os.path.splitext(name)[1].lower()
    return (suffix in IMAGE_EXTENSIONS or suffix in dicom.SUFFIXES
            or (dicom.may_be_dicom(path) and dicom.has_preamble(path)))


def is_skipped_folder(name: str) -> bool:
    return name.startswith(".") or name.lower() in SKIPPED_FOLDERS


def list_images(folder: Path, skipped: list[Path] | None = None) -> list[str]:
    """The paths of all image files under folder, recursively, in a stable order (Path order: by component);
    mask/metadata folders below it are not entered (appended to `skipped` when given).
    Strings, not Paths: a folder can hold 100k images, and building and sorting a Path for each costs seconds."""
    found = []
    for where, dirs, files in os.walk(folder, followlinks=True):
        if skipped is not None:
            skipped += [Path(where) / d for d in dirs if d.lower() in MASK_FOLDERS]
        dirs[:] = [d for d in dirs if not is_skipped_folder(d)]
        found += [path for path in (os.path.join(where, f) for f in files)
                  if is_image_file(path) and os.path.isfile(path)]
    # the separator as the lowest character: string order is then Path's component order ("a/x" before "a-b/x")
    return sorted(found, key=lambda path: path.replace(os.sep, "\0"))


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not is_skipped_folder(d.name))


def _read_class_folders(folder: Path) -> dict[str, list[str]]:
    """{class name: [image paths]} for a folder of class sub-folders."""
    classes = {}
    masks = [d for d in folder.iterdir() if d.is_dir() and d.name.lower() in MASK_FOLDERS]
    for d in _class_dirs(folder):
        files = list_images(d, masks)
        if not files:
            raise MedclfError(f"class folder has no images: {d}")
        classes[d.name] = files
    if masks:
        notice(f"{len(masks)} mask folder(s) not read as images ({', '.join(str(m.relative_to(folder)) for m in masks[:4])}"
               f"{', ...' if len(masks) > 4 else ''}): segmentation masks are not training images")
    if not classes:
        raise MedclfError(f"no class sub-folders in {folder} (expected {folder}/<class>/<image>)")
    return classes


def _folder_split(by_class: dict[str, list[str]], classes: list[str], where: Path) -> Split:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(by_class) - set(index))
    if unknown:
        raise MedclfError(f"{where} has class(es) {', '.join(unknown)} that train lacks (classes: {', '.join(classes)})")
    paths, labels = [], []
    for name, files in by_class.items():
        paths += files
        labels += [index[name]] * len(files)
    return Split(labels=np.asarray(labels, dtype=np.int64), paths=paths)


def open_folder(root: Path, classes: list[str] | None, seed: int, val_fraction: float, test_fraction: float,
                group_pattern: str | None = None) -> Source:
    split_dirs = {s: root / s for s in SPLIT_NAMES if (root / s).is_dir()}
    if split_dirs:
        found = {s: _read_class_folders(d) for s, d in split_dirs.items()}
        if classes is None:
            if "train" not in found:
                raise MedclfError(f"{root} has no train/ split; pass a trained model to evaluate a {'/'.join(found)} split")
            classes = sorted(found["train"])
            _need_two_classes(classes, split_dirs["train"])
        source = Source(root.name, "folder", root, list(classes))
        for s, by_class in found.items():
            source.splits[s] = _folder_split(by_class, source.classes, split_dirs[s])
        set_groups(source, group_pattern)
    else:
        by_class = _read_class_folders(root)
        if classes is None:
            classes = sorted(by_class)
            _need_two_classes(classes, root)
        whole = _folder_split(by_class, classes, root)
        source = Source(root.name, "folder", root, classes)
        whole.groups, source.grouping = find_groups(whole.paths, group_pattern)
        split_pool(source, whole, "the class folders", val_fraction, test_fraction, seed)
    return source


def set_groups(source: Source, group_pattern: str | None) -> None:
    """Groups for every split of given splits, from --group-pattern, DICOM tags or Kermany names where they apply."""
    everything = [p for split in source.splits.values() for p in split.paths]
    groups, source.grouping = find_groups(everything, group_pattern)
    if groups is None:
        return
    start = 0
    for split in source.splits.values():
        split.groups, start = groups[start:start + len(split)], start + len(split)


def split_pool(source: Source, whole: Split, what: str, val_fraction: float, test_fraction: float, seed: int) -> None:
    """Cut one pool of images into train/val/test, stratified by label and grouped when `whole.groups` is known."""
    parts = splits.stratified_split(whole.labels, val_fraction, test_fraction, seed, groups=whole.groups)
    for s, idx in parts.items():
        source.splits[s] = _subset(whole, idx)
        source.generated_splits[s] = f"stratified {len(idx)}/{len(whole)} of {what}{_grouped(source)}, seed {seed}"


def _grouped(source: Source) -> str:
    return f", grouped by patient ({source.grouping})" if source.grouping else ""


def _need_two_classes(classes: list[str], where: Path) -> None:
    """Training needs two classes; evaluating a model on data holding fewer of its classes is fine."""
    if len(classes) < 2:
        raise MedclfError(f"{where} has one class only ({classes[0]}); a classifier needs at least two classes "
                          "with images in train")


def open_npz(path: Path, classes: list[str] | None, class_names: list[str] | None = None) -> Source:
    """An .npz in MedMNIST layout, checked as `npz.py` describes (labels, dtypes, empty splits, classes)."""
    try:
        archive = np.load(path, mmap_mode="r")
        keys = set(archive.files)
    except Exception as exc:  # zipfile/pickle errors vary by numpy version
        raise MedclfError(f"cannot read {path} as an .npz file: {exc}") from None
    present = [s for s in SPLIT_NAMES if f"{s}_images" in keys]
    if not present:
        raise MedclfError(f"{path} has no <split>_images arrays (found keys: {', '.join(sorted(keys)) or 'none'}); "
                          "expected MedMNIST layout: train_images, train_labels, val_images, ...")
    label_sets, image_sets = {}, {}
    for s in present:
        if f"{s}_labels" not in keys:
            raise MedclfError(f"{path} has {s}_images but no {s}_labels")
        images = npz.read_array(archive, path, f"{s}_images")
        npz.check_image_shape(path, s, images)
        label_sets[s] = npz.check_labels(path, s, np.asarray(npz.read_array(archive, path, f"{s}_labels")), len(images))
        image_sets[s] = images
    rules = npz.pixel_rules(path, image_sets)
    converted = sorted({r for r in rules.values() if r != npz.AS_IS})
    if converted:
        notice(f"{path.name}: images converted to uint8 ({'; '.join(converted)})")
    multilabel = any(v.ndim == 2 for v in label_sets.values())
    check = npz.check_label_columns if multilabel else npz.check_classes
    source = Source(path.stem, "npz", path, check(path, label_sets, classes, class_names))
    source.pixel_rules = rules
    source.task = MULTILABEL if multilabel else MULTICLASS
    for s, labels in label_sets.items():
        source.splits[s] = Split(labels=labels, npz_key=s, rows=np.arange(len(labels)))
    return source


def notice(message: str) -> None:
    """A one-line warning on stderr, beside the CLI's one-line errors."""
    print(f"medclf: warning: {message}", file=sys.stderr)


def ensure_val_split(source: Source, val_fraction: float, seed: int) -> None:
    """Carve a stratified validation split out of train when the data has none (or one too small to select on)."""
    from . import layouts  # layouts builds on this module

    layouts.resplit_small_val(source, val_fraction, seed)
    if "val" in source.splits or "train" not in source.splits:
        return
    train = source.splits["train"]
    parts = splits.stratified_split(train.labels, val_fraction, 0.0, seed, groups=train.groups)
    for s, idx in parts.items():
        source.splits[s] = _subset(train, idx)
        source.generated_splits[s] = f"stratified {len(idx)}/{len(train)} of train{_grouped(source)}, seed {seed}"


def _subset(split: Split, idx: np.ndarray) -> Split:
    return Split(labels=split.labels[idx],
                 paths=[split.paths[i] for i in idx] if split.paths is not None else None,
                 npz_key=split.npz_key,
                 rows=split.rows[idx] if split.rows is not None else None,
                 groups=[split.groups[i] for i in idx] if split.groups is not None else None)


def open_source(data: str | os.PathLike, classes: list[str] | None = None, seed: int = 0,
                val_fraction: float = 0.1, test_fraction: float = 0.1, **options: str | None) -> Source:
    """Open DATA: a folder, a CSV/TSV label file, an .npz file, or a named public dataset (downloaded on first use).

    `classes` (from a trained model) fixes the label order; data with other classes is an error.
    `options`: the DATA_OPTIONS (label-file columns, --images, --group-pattern); None or absent: detected.
    """
    from . import table  # imported here: table imports this module

    unknown = sorted(set(options) - set(DATA_OPTIONS))
    if unknown:
        raise TypeError(f"open_source got unknown option(s) {', '.join(unknown)}")
    options = {k: v for k, v in options.items() if v is not None}
    text = str(data)
    path = Path(text).expanduser()
    class_names = None
    if not path.exists() and text.startswith(KAGGLE_PREFIX):
        from . import kaggle  # imported where used: it imports kagglehub

        path = kaggle.fetch(text)
    elif not path.exists():
        if not named.is_named(text):
            raise MedclfError(f"data not found: {text} (a folder, an .npz file, kaggle:OWNER/SLUG, or a dataset name "
                              "from `medclf datasets`)")
        path, class_names = named.fetch(text)
    if table.is_table(path):
        return table.open_table(path, classes, seed, val_fraction, test_fraction, **options)
    table_only = sorted(set(options) - {"group_pattern"})
    if table_only:
        raise MedclfError(f"{table.flag(table_only[0])} applies to a CSV/TSV label file; {text} is none")
    if path.is_dir():
        from . import layouts

        return open_folder(layouts.dataset_root(path), classes, seed, val_fraction, test_fraction,
                           options.get("group_pattern"))
    if path.suffix.lower() == ".npz":
        if options:
            raise MedclfError(f"--group-pattern applies to image files; {text} is an .npz file")
        source = open_npz(path, classes, class_names)
        source.planned_budget = named.planned_budget(text) if class_names is not None else None
        return source
    raise MedclfError(f"unsupported data {path}: expected a folder of images, a .csv/.tsv label file or an .npz file")


def data_options(settings: dict) -> dict[str, str]:
    """The DATA_OPTIONS set in a config (or checkpoint config) dict, for open_source."""
    return {k: settings[k] for k in DATA_OPTIONS if settings.get(k) is not None}


def groups_of(source: Source, ids: list[str]) -> list[str] | None:
    """The group of each id (as a store lists them, unreadable files skipped) from the source's splits;
    None unless every id has one."""
    by_id = {}
    for split in source.splits.values():
        if split.groups is not None:
            by_id.update(zip(split.ids, split.groups))
    if not ids or any(i not in by_id for i in ids):
        return None
    return [by_id[i] for i in ids]


def open_inputs(inputs: list[str]) -> Split:
    """Image files and folders (recursive) given to `predict`, as an unlabelled split."""
    paths: list[str] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise MedclfError(f"no images found under {p}")
            paths += found
        elif p.is_file():
            paths.append(str(p))
        else:
            raise MedclfError(f"input not found: {item}")
    return Split(labels=np.full(len(paths), -1, dtype=np.int64), paths=paths)
