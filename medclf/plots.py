"""Matplotlib figures for a run: training curves, confusion matrix, ROC curves."""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .metrics import _skm  # noqa: E402  (scikit-learn, imported on first use)


def read_history(path: Path) -> dict[str, list[float]]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) if r[k] not in ("", "nan", "None") else np.nan for r in rows] for k in (rows[0] if rows else {})}


def curves_figure(history: dict[str, list[float]], title: str = "") -> plt.Figure:
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = history.get("epoch", [])
    ax_loss.plot(epochs, history.get("train_loss", []), "o-", label="train loss")
    ax_loss.plot(epochs, history.get("val_loss", []), "o-", label="val loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    for key in ("val_accuracy", "val_auc", "val_f1_macro"):
        ax_metric.plot(epochs, history.get(key, []), "o-", label=key.removeprefix("val_"))
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylabel("validation metric")
    ax_metric.legend()
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_figure(cm: list[list[int]], classes: list[str], title: str = "confusion matrix") -> plt.Figure:
    cm = np.asarray(cm)
    side = max(4.0, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = cm.max() / 2 if cm.size else 0
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > threshold else "black")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def curve_classes(labels: np.ndarray, classes: list[str]):
    """(class index, positives mask) per curve: class 1 for binary, every class (one-vs-rest) otherwise;
    classes without both outcomes in `labels` are skipped (no curve is defined)."""
    for c in [1] if len(classes) == 2 else range(len(classes)):
        positives = labels == c
        if positives.any() and not positives.all():
            yield c, positives


def roc_figure(labels: np.ndarray, probs: np.ndarray, classes: list[str], title: str = "ROC") -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5, 5))
    for c, positives in curve_classes(labels, classes):
        fpr, tpr, _ = _skm().roc_curve(positives, probs[:, c])
        ax.plot(fpr, tpr, label=classes[c])
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("1 − specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def save(fig: plt.Figure, path: Path) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_run_plots(out: Path, history_csv: Path, cm, classes, labels, probs, split: str) -> None:
    """curves.png, confusion_matrix.png and roc.png in the run directory."""
    save(curves_figure(read_history(history_csv), out.name), out / "curves.png")
    save(confusion_figure(cm, classes, f"confusion matrix ({split})"), out / "confusion_matrix.png")
    save(roc_figure(labels, probs, classes, f"ROC ({split})"), out / "roc.png")
