"""A --folds run made by hand from an ordinary run, so the report and compare tests need no cross-validation."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np

from medclf import metrics
from medclf.oof import write_oof
from medclf.serialize import json_safe


def fake_folds_run(run: Path, dest: Path, classes: list[str], k: int = 3, seed: int = 0) -> Path:
    """A copy of RUN dressed as a `--folds` run: oof.csv with made-up probabilities for its train+val images,
    metrics.json with "estimate", "oof" and RUN's "test", and no "val"."""
    shutil.copytree(run, dest)
    rows = [r for r in csv.DictReader(open(dest / "splits.csv")) if r["split"] in ("train", "val")]
    labels = np.array([classes.index(r["label"]) for r in rows])
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(len(classes)), size=len(rows))
    probs[np.arange(len(rows)), labels] += rng.random(len(rows))  # better than chance, with some mistakes
    probs /= probs.sum(1, keepdims=True)
    folds = np.arange(len(rows)) % k + 1
    write_oof(dest / "oof.csv", [(r["split"], r["id"]) for r in rows], labels, probs, folds, classes)
    saved = json.loads((dest / "metrics.json").read_text())
    threshold = saved["val"].get("threshold", {}).get("value")
    result = {"estimate": metrics.estimate(labels, probs, classes, metrics.METHOD_OOF.format(k=k), n_boot=100),
              "oof": json_safe(metrics.evaluate_predictions(labels, probs, classes, threshold)),
              "test": saved["test"]}
    (dest / "metrics.json").write_text(json.dumps(result, indent=2))
    return dest
