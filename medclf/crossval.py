"""`medclf train DATA --folds K`: K-fold cross-validation on train+val, an out-of-fold estimate, a fold ensemble.

Train and val are pooled and cut into K stratified folds (grouped by patient where file names carry
the patient, so no patient's images sit on both sides of a fold). Fold f trains on the other K-1
folds under OUT/fold-f/ (an ordinary `fit`: final weights of a completed schedule, so its held-out
fold chooses nothing) and predicts its held-out fold. Those out-of-fold predictions cover every
image once: OUT/oof.csv, metrics.json "oof" and the run's `estimate`. The run's model.pt is the
ensemble of the K fold models, or with `--refit` one model retrained on all of train+val for as
many epochs as the folds ran. A test split, when DATA has one, is predicted by that model only.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch

from . import atomic, models
from .config import TrainConfig
from .data import sources
from .data.store import Store
from .errors import MedclfError
from .evaluation import choose_threshold
from .inference import predict_store
from .metrics import METHOD_OOF, estimate, evaluate_predictions
from .model_card import headline_intervals
from .oof import OOF_FILE, write_oof
from .serialize import json_safe

FOLD_DONE = "metrics.json"  # written last in a fold folder: the fold is finished


def pool(stores: dict[str, Store]) -> tuple[Store, list[str]]:
    """Train and val as one store (in that order), and the split each image came from."""
    parts = [stores[s] for s in ("train", "val")]
    images = (torch.cat([p.images for p in parts]) if all(isinstance(p.images, torch.Tensor) for p in parts)
              else torch.from_numpy(np.concatenate([np.asarray(p.images) for p in parts])))
    labels = torch.cat([p.labels for p in parts])
    origin = ["train"] * len(parts[0]) + ["val"] * len(parts[1])
    return Store(images, labels, list(parts[0].ids) + list(parts[1].ids)), origin


def subset(store: Store, idx: np.ndarray) -> Store:
    index = torch.from_numpy(np.asarray(idx, dtype=np.int64))
    return Store(store.take(index), store.labels[index], [store.ids[i] for i in idx])


def assign_folds(labels: np.ndarray, groups: list[str] | None, k: int, seed: int) -> np.ndarray:
    """The fold (0..k-1) of every image: stratified by label, and grouped when groups are known."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold  # slow to import: only here

    counts = np.bincount(labels)
    if len(labels) < k or counts[counts > 0].min() < k:
        raise MedclfError(f"--folds {k} needs at least {k} images of every class in train+val "
                          f"(the smallest class has {counts[counts > 0].min()}); use fewer folds")
    if groups is not None and len(set(groups)) < k:  # k folds of whole patients need k patients at least
        raise MedclfError(f"--folds {k} needs at least {k} patients/groups to keep each patient in one fold "
                          f"(the data has {len(set(groups))}); use fewer folds")
    fold = np.full(len(labels), -1)
    if groups is not None:
        cutter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        parts = cutter.split(np.zeros(len(labels)), labels, groups)
    else:
        parts = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)
    for f, (_, held) in enumerate(parts):
        fold[held] = f
    assert (fold >= 0).all()
    return fold


def train_folds(cfg: TrainConfig, source, stores: dict[str, Store], spec: dict, base: dict | None, env: dict,
                out: Path, resolved: dict) -> dict:
    """Cross-validate, write the run's files, return {"out", "metrics", "history"} like a single run."""
    from .training import DIVERGED, fit, read_fold_state  # training imports this module lazily: no cycle at import time

    k = cfg.folds
    everything, origin = pool(stores)
    labels = everything.labels.numpy()
    groups = sources.groups_of(source, everything.ids)
    fold = assign_folds(labels, groups, k, cfg.seed)
    n_models = k + int(cfg.refit)
    # a fold's held-out images must choose nothing: no early stopping on them, no best epoch, the whole schedule
    honest = {"patience": 0, "stop_saturated": False, "checkpoint": "final"}
    changed = [f"{name} {getattr(cfg, name)}" for name, value in honest.items()
               if getattr(cfg, name) != value and name != "stop_saturated"]  # on by default: no one asked for it
    if changed:
        sources.notice(f"cross-validation ignores {', '.join(changed)}: each fold trains its whole schedule and keeps "
                       "its final weights, so the fold it predicts chooses nothing")
    per_model = dataclasses.replace(cfg, time_budget=cfg.time_budget / n_models if cfg.time_budget else None, **honest)
    if groups is not None and len(set(groups)) < k:
        sources.notice(f"only {len(set(groups))} patients for {k} folds: folds are not grouped by patient")
        groups = None
    grouping = f", grouped by patient ({len(set(groups))} patients)" if groups else ""
    print(f"medclf: {k}-fold cross-validation on {len(everything)} train+val images{grouping}, {spec['num_classes']} "
          f"classes, {spec['arch']} ({spec['stem']} stem, {spec['input_size']} px) → {out}")
    oof = np.zeros((len(everything), spec["num_classes"]), np.float32)
    members, histories = [], []
    for f in range(k):
        fold_dir = out / f"fold-{f + 1}"
        held = np.flatnonzero(fold == f)
        train_part, held_part = subset(everything, np.flatnonzero(fold != f)), subset(everything, held)
        fold_cfg = dataclasses.replace(per_model, seed=(cfg.seed + f) % 2**32)
        if not (fold_dir / FOLD_DONE).is_file():
            fold_dir.mkdir(exist_ok=True)
            fit(fold_cfg, spec, base, train_part, held_part, fold_dir, with_fold(env, f + 1), read_fold_state(fold_dir),
                resolved, desc=f"fold {f + 1}/{k} ", resume_dir=out)
        if not (fold_dir / "model.pt").is_file():
            raise MedclfError(f"fold {f + 1} produced no usable checkpoint in {fold_dir}: its validation loss was not "
                              f"finite in any epoch {DIVERGED}")
        model, ckpt = models.load_model(fold_dir / "model.pt")
        model = model.to(env["device"], memory_format=torch.channels_last if env["channels_last"] else torch.contiguous_format)
        oof[held] = predict_store(model, held_part, spec, env["device"], env["precision"], env["channels_last"],
                                  tta=cfg.tta, desc=f"fold {f + 1} held-out")
        atomic.write_text(fold_dir / FOLD_DONE, json.dumps(json_safe(
            {"val": evaluate_predictions(held_part.labels.numpy(), oof[held], spec["classes"])}), indent=2))
        members.append(ckpt)
        histories.append(_read_history(fold_dir / "history.csv"))
    threshold = choose_threshold(labels, oof)
    results = {"oof": evaluate_predictions(labels, oof, spec["classes"], threshold, chosen_on="out-of-fold")}
    results["oof"]["tta"] = cfg.tta
    results["oof"].update(headline_intervals(labels, oof, spec["classes"]))  # the model card quotes them
    results["estimate"] = estimate(labels, oof, spec["classes"], METHOD_OOF.format(k=k), cis=results["oof"]["ci95"])
    extra = {"config": resolved, "threshold": threshold, "folds": k}
    if cfg.refit:
        epochs = int(math.ceil(np.median([len(h) for h in histories])))  # as long as the folds trained
        refit_cfg = dataclasses.replace(per_model, epochs=epochs)
        refit_dir = out / "refit"
        refit_dir.mkdir(exist_ok=True)
        if not (refit_dir / FOLD_DONE).is_file():
            print(f"medclf: refit on all {len(everything)} train+val images for {epochs} epoch(s)")
            fit(refit_cfg, spec, base, everything, None, refit_dir, with_fold(env, "refit"), read_fold_state(refit_dir),
                resolved, desc="refit ", resume_dir=out)
            atomic.write_text(refit_dir / FOLD_DONE, json.dumps({"epochs": epochs, "images": len(everything)}))
        final = models.read_checkpoint(refit_dir / "model.pt")
        final.update(extra)
    else:
        final = models.ensemble_checkpoint(members, extra)
    atomic.torch_save(final, out / "model.pt")
    write_oof(out / OOF_FILE, list(zip(origin, everything.ids)), labels, oof, fold + 1, spec["classes"])
    write_mean_history(out / "history.csv", histories)
    curves = {"oof": (labels, oof)}
    shown_stores = {"oof": everything}
    if "test" in stores:
        model, _ = models.load_model(out / "model.pt")
        model = model.to(env["device"], memory_format=torch.channels_last if env["channels_last"] else torch.contiguous_format)
        probs = predict_store(model, stores["test"], spec, env["device"], env["precision"], env["channels_last"],
                              tta=cfg.tta, desc="test")
        test_labels = stores["test"].labels.numpy()
        results["test"] = evaluate_predictions(test_labels, probs, spec["classes"], threshold, chosen_on="out-of-fold")
        results["test"]["tta"] = cfg.tta
        results["test"].update(headline_intervals(test_labels, probs, spec["classes"]))
        curves["test"] = (test_labels, probs)
        shown_stores["test"] = stores["test"]
    results = json_safe(results)
    atomic.write_text(out / "metrics.json", json.dumps(results, indent=2))
    e = results["estimate"]
    print(f"out-of-fold ({len(labels)} images): " + ", ".join(
        f"{m} {e[m]['value']:.4f} [{e[m]['ci95'][0]:.3f}, {e[m]['ci95'][1]:.3f}]"
        for m in ("accuracy", "auc") if e.get(m) and e[m]["value"] is not None) + f" → {out}")
    from .reporting import run_report  # matplotlib: imported once training is done

    run_report.write_run_outputs(out, results, curves, spec["classes"], shown_stores, str(env["device"]))
    return {"out": str(out), "metrics": results, "history": [row for h in histories for row in h]}


def with_fold(env: dict, fold: int | str) -> dict:
    """The training environment whose per-epoch hook (training.train's on_epoch) is told the fold of each epoch."""
    hook = env.get("on_epoch")
    if hook is None:
        return env
    return {**env, "on_epoch": lambda epoch, row: hook(epoch, {**row, "fold": fold})}


def _read_history(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


def write_mean_history(path: Path, histories: list[list[dict]]) -> None:
    """The folds' learning curves averaged epoch by epoch (over the folds that trained that epoch)."""
    from .training import write_history

    rows = []
    for epoch in range(max(len(h) for h in histories)):
        at = [h[epoch] for h in histories if len(h) > epoch]
        row = {k: float(np.nanmean([r.get(k, math.nan) for r in at])) if any(
            math.isfinite(r.get(k, math.nan)) for r in at) else "" for k in at[0]}
        rows.append({**row, "epoch": epoch + 1})
    write_history(path, rows)
