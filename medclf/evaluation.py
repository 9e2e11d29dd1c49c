"""`medclf evaluate` and `medclf predict`: metrics on a split, probabilities for images (via medclf.inference)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from . import atomic, tasks
from .data.splits import label_text
from .errors import MedclfError
from .inference import input_store, load_for_inference, split_store
from .metrics import evaluate_predictions, label_thresholds, youden_threshold
from .serialize import json_safe


def evaluate(run_or_model: str, data: str, split: str = "test", tta: bool = False, out: str | None = None,
             device: str = "auto", precision: str = "auto", skip_bad: bool = False, cache: bool = True,
             **data_options: str | None) -> dict:
    """Metrics of a trained model on one split of DATA: {split: {...}} (the metrics.json schema).
    `data_options` (label-file columns, images, group_pattern) override those the run trained with."""
    out_path = output_file(out, "--out", "the metrics JSON") if out else None
    loaded = load_for_inference(run_or_model, device, precision)
    ckpt = loaded.ckpt
    store, _ = split_store(ckpt, data, split, skip_bad, cache, data_options)
    probs = loaded.predict(store, tta=tta, desc=f"evaluate {split}")
    result = {split: evaluate_predictions(store.labels.numpy(), probs, ckpt["classes"], tasks.decision_threshold(ckpt))}
    result[split]["tta"] = tta
    result = json_safe(result)
    if out_path:
        atomic.write_text(out_path, json.dumps(result, indent=2))
    return result


def predict(run_or_model: str, inputs: list[str], split: str | None = None, out: str | None = "predictions.csv",
            tta: bool = False, device: str = "auto", precision: str = "auto", skip_bad: bool = False,
            cache: bool = True, engine: str = "torch", **data_options: str | None) -> list[dict]:
    """Predictions for image files/folders, or for a split of DATA. Writes a CSV when `out` is given.

    engine: torch, onnx / openvino (ONNX Runtime / OpenVINO on the model's ONNX export) or auto; precision "int8"
    runs the export's int8 quantization (see inference.load_for_inference). `data_options` (label-file columns,
    images, group_pattern) describe DATA with `split`, overriding those the run trained with."""
    given = sorted(k for k, v in data_options.items() if v is not None)
    if given and split is None:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise MedclfError(f"{flags} tell(s) how to read DATA: add --split SPLIT to predict one of its splits")
    out_path = output_file(out, "--out", "the predictions CSV") if out else None
    loaded = load_for_inference(run_or_model, device, precision, engine)
    classes = loaded.ckpt["classes"]
    if split is not None:
        if len(inputs) != 1:
            raise MedclfError("--split takes exactly one DATA input")
        store, kind = split_store(loaded.ckpt, inputs[0], split, skip_bad, cache, data_options)
    else:
        store, kind = input_store(loaded.ckpt, inputs, skip_bad), "folder"
    key = "index" if kind == "npz" else "path"
    probs = loaded.predict(store, tta=tta, desc="predict")
    rows = []
    labels = store.labels.numpy()
    decisions = tasks.predicted_names(probs, loaded.ckpt)  # multi-label: the decided label set, "A|B"
    for i, (ident, p) in enumerate(zip(store.ids, probs)):
        row = {key: ident}
        if labels.ndim == 2 or labels[i] >= 0:
            row["label"] = label_text(labels[i], classes)
        row["prediction"] = decisions[i]
        row.update({f"prob_{c}": float(v) for c, v in zip(classes, p)})
        rows.append(row)
    if out_path:
        _write_csv(out_path, rows, classes, has_labels=bool((labels >= 0).any()), key=key)
    return rows


def output_file(path: str | Path, flag: str, what: str) -> Path:
    """A file to write: refused when it names a folder; its missing parent folders are created."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise MedclfError(f"{flag} {path} is a folder; give a file name for {what}, e.g. {path / 'out'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise MedclfError(f"{flag} {path}: {path.parent} is a file, not a folder") from None
    return path


def _write_csv(path: Path, rows: list[dict], classes: list[str], has_labels: bool, key: str) -> None:
    columns = [key] + (["label"] if has_labels else []) + ["prediction"] + [f"prob_{c}" for c in classes]
    with atomic.open_atomic(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def choose_threshold(labels: np.ndarray, probs: np.ndarray) -> float | list[float] | None:
    """Youden's J threshold on validation for binary tasks, one per label for multi-label (N×L) labels, else None."""
    if labels.ndim == 2:
        return label_thresholds(labels, probs)
    return youden_threshold(labels, probs[:, 1]) if probs.shape[1] == 2 else None
