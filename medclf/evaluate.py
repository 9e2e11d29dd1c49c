"""Evaluate and predict: batched, gradient-free inference with test-time augmentation."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import runtime
from .data import sources
from .data.augment import prepare_batch
from .data.store import Store, build_store
from .errors import MedclfError
from .metrics import evaluate_predictions, json_safe, youden_threshold
from .models import load_model

INFER_BATCH = 256  # images per forward pass: large batches keep every core busy, memory stays < 1 GB at 224 px


@torch.inference_mode()
def predict_store(model: nn.Module, store: Store, spec: dict[str, Any], device: torch.device, precision: str,
                  channels_last: bool, tta: bool = False, batch_size: int = INFER_BATCH, desc: str | None = None) -> np.ndarray:
    """Class probabilities (N×K float32) for every image in the store."""
    was_training = model.training
    model.eval()
    out = []
    order = torch.arange(len(store))
    for idx in tqdm(order.split(batch_size), desc=desc or "predict", unit="batch", leave=False,
                    disable=desc is None or len(store) < 4 * batch_size):
        x = prepare_batch(store.take(idx).to(device, non_blocking=True), spec["input_size"], spec["mean"], spec["std"],
                          spec["in_chans"], crop=spec.get("crop", 1.0))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with runtime.autocast(device, precision):
            logits = model(x).float()
            if tta:  # average the original and the horizontally flipped image
                logits = torch.stack([logits.softmax(1), model(x.flip(-1)).float().softmax(1)]).mean(0).log()
        out.append(logits.softmax(1).cpu())
    model.train(was_training)
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, spec["num_classes"]), np.float32)


def _load_for_inference(run_or_model: str, device: str, precision: str):
    model, ckpt = load_model(run_or_model)
    dev = runtime.pick_device(device)
    prec = runtime.pick_precision(precision, dev)
    cl = runtime.use_channels_last(None, dev, prec)
    model = model.to(dev, memory_format=torch.channels_last if cl else torch.contiguous_format)
    return model, ckpt, dev, prec, cl


def _split_store(ckpt: dict, data: str, split: str, skip_bad: bool, cache: bool) -> tuple[Store, str]:
    cfg = ckpt.get("config", {})  # the training run's split settings, so generated splits match the run's
    source = sources.open_source(data, classes=ckpt["classes"], seed=cfg.get("seed", 0),
                                 val_fraction=cfg.get("val_fraction", 0.1), test_fraction=cfg.get("test_fraction", 0.1))
    if split == "val" and "train" in source.splits:
        sources.ensure_val_split(source, cfg.get("val_fraction", 0.1), cfg.get("seed", 0))
    if split not in source.splits:
        raise MedclfError(f"{data} has no {split!r} split (has: {', '.join(source.splits)})")
    store_size = ckpt.get("store_size", ckpt["input_size"]) if source.kind == "folder" else None
    if store_size is None:
        from .data.store import native_size
        store_size = native_size(source)
    store, _ = build_store(source, split, store_size, ckpt["in_chans"], skip_bad=skip_bad, cache=cache, desc=split)
    return store, source.kind


def evaluate(run_or_model: str, data: str, split: str = "test", tta: bool = False, out: str | None = None,
             device: str = "auto", precision: str = "auto", skip_bad: bool = False, cache: bool = True) -> dict:
    """Metrics of a trained model on one split of DATA: {split: {...}} (the metrics.json schema)."""
    model, ckpt, dev, prec, cl = _load_for_inference(run_or_model, device, precision)
    store, _ = _split_store(ckpt, data, split, skip_bad, cache)
    probs = predict_store(model, store, ckpt, dev, prec, cl, tta=tta, desc=f"evaluate {split}")
    result = {split: evaluate_predictions(store.labels.numpy(), probs, ckpt["classes"], ckpt.get("threshold"))}
    result[split]["tta"] = tta
    result = json_safe(result)
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    return result


def predict(run_or_model: str, inputs: list[str], split: str | None = None, out: str | None = "predictions.csv",
            tta: bool = False, device: str = "auto", precision: str = "auto", skip_bad: bool = False,
            cache: bool = True) -> list[dict]:
    """Predictions for image files/folders, or for a split of DATA. Writes a CSV when `out` is given."""
    model, ckpt, dev, prec, cl = _load_for_inference(run_or_model, device, precision)
    classes = ckpt["classes"]
    if split is not None:
        if len(inputs) != 1:
            raise MedclfError("--split takes exactly one DATA input")
        store, kind = _split_store(ckpt, inputs[0], split, skip_bad, cache)
        is_npz = kind == "npz"
    else:
        split_info = sources.open_inputs(inputs)
        split_info.labels = _labels_from_parent_folders(split_info.paths, classes)
        source = sources.Source("inputs", "folder", Path("."), classes, {"inputs": split_info})
        store, _ = build_store(source, "inputs", ckpt.get("store_size", ckpt["input_size"]), ckpt["in_chans"],
                               skip_bad=skip_bad, cache=False, desc="inputs")
        is_npz = False
    probs = predict_store(model, store, ckpt, dev, prec, cl, tta=tta, desc="predict")
    rows = []
    labels = store.labels.numpy()
    for i, (ident, p) in enumerate(zip(store.ids, probs)):
        row = {"index" if is_npz else "path": ident}
        if labels[i] >= 0:
            row["label"] = classes[labels[i]]
        row["prediction"] = classes[int(p.argmax())]
        row.update({f"prob_{c}": float(v) for c, v in zip(classes, p)})
        rows.append(row)
    if out:
        _write_csv(Path(out), rows, classes, has_labels=bool((labels >= 0).any()), key="index" if is_npz else "path")
    return rows


def _labels_from_parent_folders(paths: list[str], classes: list[str]) -> np.ndarray:
    """Known labels for images that sit in a folder named after a class (e.g. test/NORMAL/x.jpeg)."""
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index.get(Path(p).parent.name, -1) for p in paths], dtype=np.int64)


def _write_csv(path: Path, rows: list[dict], classes: list[str], has_labels: bool, key: str) -> None:
    columns = [key] + (["label"] if has_labels else []) + ["prediction"] + [f"prob_{c}" for c in classes]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def choose_threshold(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """Youden's J threshold on validation for binary tasks, else None."""
    return youden_threshold(labels, probs[:, 1]) if probs.shape[1] == 2 else None
