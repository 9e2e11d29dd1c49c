"""What an .npz file must hold, checked when it is opened, and how its pixels become uint8.

Labels: integers (or floats with integral values), one per image, N or N×1; or, for a multi-label task
(several findings per image, as in ChestMNIST), N×L values 0/1, one column per label.
Images: N×H×W or N×H×W×C (C = 1 or 3), at least one row and one pixel, of these dtypes:
- uint8: used as is;
- uint16: each image's used range stretched to 0..255, as for 16-bit image files;
- other integer types: used as is when every value lies in 0..255;
- floats: every value finite; in [0, 1] (the whole file) scaled by 255, else in [0, 255] and rounded.
Every conversion is announced in one line when the file is opened.
"""
from __future__ import annotations

import numpy as np

from ..errors import MedclfError

AS_IS, STRETCH16, FLOAT01, FLOAT255 = "as is", "uint16 stretched per image to 0..255", "[0, 1] × 255", "[0, 255]"


def read_array(archive, path, key: str) -> np.ndarray:
    """archive[key], with numpy's refusal of pickled objects turned into our error."""
    try:
        return archive[key]
    except ValueError as exc:  # "Object arrays cannot be loaded when allow_pickle=False"
        raise MedclfError(f"{path}: {key} holds Python objects, not numbers ({str(exc).split(';')[0]}); "
                          "save plain numeric arrays") from None


def check_labels(path, split: str, raw: np.ndarray, rows: int) -> np.ndarray:
    """The split's labels as int64 N, or an error naming what is wrong with them."""
    name = f"{split}_labels"
    if raw.dtype.kind not in "biuf":
        raise MedclfError(f"{path}: {name} must hold integer class indices, got {raw.dtype} values")
    if raw.ndim == 2 and raw.shape[1] != 1:
        return check_label_matrix(path, split, raw, rows)
    if raw.ndim not in (1, 2):
        raise MedclfError(f"{path}: {name} must be N or N×1, got shape {raw.shape}")
    labels = raw.reshape(-1)
    if len(labels) != rows:
        raise MedclfError(f"{path}: {split}_images has {rows} rows but {name} has {len(labels)}")
    if raw.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(labels) | (labels != np.round(labels)))
        if len(bad):
            raise MedclfError(f"{path}: {name} row {bad[0]} is {labels[bad[0]]}; labels must be integer class indices")
        if len(labels) and np.abs(labels).max() > 2 ** 31:
            raise MedclfError(f"{path}: {name} holds {np.abs(labels).max():g}; labels must be class indices 0..K-1")
    return labels.astype(np.int64)


def check_label_matrix(path, split: str, raw: np.ndarray, rows: int) -> np.ndarray:
    """Multi-label labels: int64 N×L of 0/1, or an error naming the first bad row."""
    name = f"{split}_labels"
    if len(raw) != rows:
        raise MedclfError(f"{path}: {split}_images has {rows} rows but {name} has {len(raw)}")
    bad = np.flatnonzero(~np.isin(raw, (0, 1)).all(1))
    if len(bad):
        raise MedclfError(f"{path}: {name} has shape {raw.shape} (multi-label) but row {bad[0]} holds "
                          f"{raw[bad[0]].tolist()}; multi-label rows must hold 0/1 per label")
    return raw.astype(np.int64)


def check_label_columns(path, labels: dict[str, np.ndarray], classes: list[str] | None,
                        class_names: list[str] | None) -> list[str]:
    """The label names of a multi-label file: the model's (same count), the dataset's, or "0".."L-1"."""
    widths = {s: (v.shape[1] if v.ndim == 2 else 1) for s, v in labels.items()}
    if len(set(widths.values())) != 1:
        shown = ", ".join(f"{s}_labels {w}" for s, w in widths.items())
        raise MedclfError(f"{path}: splits disagree on the number of labels ({shown}); every split needs the same columns")
    width = next(iter(widths.values()))
    if classes is not None:
        if width != len(classes):
            raise MedclfError(f"{path}: labels have {width} column(s) but the model has {len(classes)} labels "
                              f"({', '.join(classes)})")
        return list(classes)
    if "train" in labels and not labels["train"].any(0).any():
        raise MedclfError(f"{path}: train_labels have no positive label; a classifier needs positives to learn from")
    return list(class_names) if class_names and len(class_names) == width else [str(i) for i in range(width)]


def check_image_shape(path, split: str, images: np.ndarray) -> None:
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise MedclfError(f"{path}: {split}_images must be N×H×W or N×H×W×3, got shape {images.shape}")
    if images.shape[0] == 0:
        raise MedclfError(f"{path}: {split}_images has no rows; drop the empty split or fill it")
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise MedclfError(f"{path}: {split}_images has empty images (shape {images.shape})")


def pixel_rules(path, arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """How each split's images (arrays: split -> images) become uint8; refuses what cannot."""
    rules = {}
    floats = {s: a for s, a in arrays.items() if a.dtype.kind == "f"}
    for split, images in arrays.items():
        kind = images.dtype.kind
        if images.dtype == np.uint8:
            rules[split] = AS_IS
        elif images.dtype == np.uint16:
            rules[split] = STRETCH16
        elif kind in "iu":
            lo, hi = int(images.min()), int(images.max())
            if lo < 0 or hi > 255:
                raise MedclfError(f"{path}: {split}_images ({images.dtype}) holds values {lo}..{hi}; "
                                  "integer images must lie in 0..255 (or be uint8/uint16)")
            rules[split] = AS_IS
        elif kind != "f":
            raise MedclfError(f"{path}: {split}_images has dtype {images.dtype}; use uint8, uint16 or float images")
    if floats:
        rule = _float_rule(path, floats)
        rules.update({s: rule for s in floats})
    return rules


def _float_rule(path, floats: dict[str, np.ndarray]) -> str:
    """One scale for every float split of the file, so train and test are scaled alike."""
    lo, hi = np.inf, -np.inf
    for split, images in floats.items():
        finite = np.isfinite(images).reshape(len(images), -1).all(1)
        if not finite.all():
            raise MedclfError(f"{path}: {split}_images row {np.flatnonzero(~finite)[0]} holds NaN or infinity")
        lo, hi = min(lo, float(images.min())), max(hi, float(images.max()))
    if lo >= 0 and hi <= 1:
        return FLOAT01
    if lo >= 0 and hi <= 255:
        return FLOAT255
    raise MedclfError(f"{path}: float images hold values {lo:g}..{hi:g}; scale them to [0, 1] or [0, 255]")


def to_uint8(images: np.ndarray, rule: str) -> np.ndarray:
    """Images converted to uint8 by rule (from `pixel_rules`)."""
    if rule == FLOAT01:
        return np.round(images.astype(np.float32) * 255).astype(np.uint8)
    if rule == FLOAT255:
        return np.round(images.astype(np.float32)).astype(np.uint8)
    if rule == STRETCH16:
        a = images.astype(np.float32)
        flat = a.reshape(len(a), -1)
        lo, hi = flat.min(1), flat.max(1)
        scale = np.where(hi > lo, 255.0 / np.maximum(hi - lo, 1), 0.0)
        shape = (-1,) + (1,) * (a.ndim - 1)
        return np.round((a - lo.reshape(shape)) * scale.reshape(shape)).astype(np.uint8)
    return images.astype(np.uint8, copy=False)


def check_classes(path, labels: dict[str, np.ndarray], classes: list[str] | None,
                  class_names: list[str] | None) -> list[str]:
    """The class list: the model's (labels must fit it), or made from the labels of train (which must be 0..K-1)."""
    for split, values in labels.items():
        if values.min() < 0 or (classes is not None and values.max() >= len(classes)):
            top = f"0..{len(classes) - 1}" if classes is not None else "0 or more"
            raise MedclfError(f"{path}: {split}_labels out of range: values must be {top}, "
                              f"found {values.min()}..{values.max()}")
    if classes is not None:
        return list(classes)
    reference = labels["train"] if "train" in labels else np.concatenate(list(labels.values()))
    present = np.unique(reference)
    top = int(present.max())
    which = "train_labels" if "train" in labels else "labels"
    if len(present) != top + 1:
        # the first five missing values lie below len(present) + 5: no need to list all of 0..top
        missing = np.setdiff1d(np.arange(min(top + 1, len(present) + 5)), present)[:5]
        shown = ", ".join(map(str, missing)) + (", ..." if top + 1 - len(present) > 5 else "")
        raise MedclfError(f"{path}: {which} skip class(es) {shown} (values up to {top}, {len(present)} used); "
                          "remap labels to 0..K-1")
    if "train" in labels and len(present) < 2:
        raise MedclfError(f"{path}: train_labels hold one class only ({top}); "
                          "a classifier needs at least two classes with images in train")
    for split, values in labels.items():
        if values.max() > top:
            extra = sorted(set(np.unique(values[values > top]).tolist()))
            raise MedclfError(f"{path}: {split}_labels have class(es) {', '.join(map(str, extra[:5]))} "
                              f"that train lacks (train classes 0..{top})")
    return class_names if class_names and len(class_names) > top else [str(i) for i in range(top + 1)]
