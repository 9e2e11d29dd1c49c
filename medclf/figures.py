"""Figures for report.html and comparison.html (run plots live in plots.py)."""
from __future__ import annotations

import numpy as np

from .metrics import _skm
from .plots import curve_classes, plt  # Agg backend already selected there

COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def pr_figure(labels: np.ndarray, probs: np.ndarray, classes: list[str], title: str = "precision-recall") -> plt.Figure:
    skm = _skm()
    fig, ax = plt.subplots(figsize=(5, 5))
    for c, positives in curve_classes(labels, classes):
        precision, recall, _ = skm.precision_recall_curve(positives, probs[:, c])
        ap = skm.average_precision_score(positives, probs[:, c])
        ax.plot(recall, precision, label=f"{classes[c]} (AP {ap:.3f})")
        ax.axhline(positives.mean(), color="grey", lw=0.6, ls=":")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (positive predictive value)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def reliability_figure(bins: dict, ece: float, title: str = "calibration") -> plt.Figure:
    """Reliability diagram (accuracy against confidence per bin) over a histogram of the confidences."""
    conf, acc, count = (np.asarray(bins[k]) for k in ("bin_confidence", "bin_accuracy", "bin_count"))
    width = 1.0 / len(count)
    centres = (np.arange(len(count)) + 0.5) * width
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    used = count > 0
    ax.bar(centres[used], acc[used], width=width * 0.9, color="#2f6fd0", alpha=0.8, label="accuracy in bin")
    ax.plot(conf[used], acc[used], "o", color="#b3261e", ms=3, label="mean confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{title} (ECE {ece:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    ax_n.bar(centres, count, width=width * 0.9, color="#8a96a3")
    ax_n.set_xlabel("confidence of the predicted class")
    ax_n.set_ylabel("images")
    ax_n.set_xlim(0, 1)
    fig.tight_layout()
    return fig


def arm_curves_figure(histories: dict[str, list[dict[str, list[float]]]]) -> plt.Figure:
    """Validation loss, AUC and accuracy per epoch; one colour per arm, one line per seed."""
    keys = [("val_loss", "validation loss"), ("val_auc", "validation AUC"), ("val_accuracy", "validation accuracy")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for i, (arm, runs) in enumerate(histories.items()):
        color = COLORS[i % len(COLORS)]
        for j, history in enumerate(runs):
            for ax, (key, _) in zip(axes, keys):
                if key in history and history.get("epoch"):
                    ax.plot(history["epoch"], history[key], "o-", ms=3, color=color, alpha=0.75,
                            label=arm if j == 0 else None)
    for ax, (_, name) in zip(axes, keys):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def arm_roc_figure(labels: np.ndarray, probs_by_arm: dict[str, np.ndarray], classes: list[str], title: str) -> plt.Figure:
    """One ROC curve per arm: on the positive class (binary) or micro-averaged one-vs-rest."""
    skm = _skm()
    fig, ax = plt.subplots(figsize=(5.2, 5))
    k = len(classes)
    for i, (arm, probs) in enumerate(probs_by_arm.items()):
        if k == 2:
            if len(np.unique(labels)) < 2:
                continue
            fpr, tpr, _ = skm.roc_curve(labels == 1, probs[:, 1])
        else:
            onehot = np.eye(k, dtype=bool)[labels]
            fpr, tpr, _ = skm.roc_curve(onehot.ravel(), probs.ravel())
        ax.plot(fpr, tpr, color=COLORS[i % len(COLORS)], label=arm)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("1 − specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title + ("" if k == 2 else " (micro-average over classes)"))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def confusion_grid_figure(cms: dict[str, list[list[int]]], classes: list[str]) -> plt.Figure:
    """Confusion matrices side by side, one per arm, on one colour scale."""
    n = len(cms)
    side = max(3.2, 0.5 * len(classes) + 2)
    fig, axes = plt.subplots(1, n, figsize=(side * n, side), squeeze=False)
    top = max(int(np.max(cm)) for cm in cms.values()) if cms else 1
    for ax, (arm, cm) in zip(axes[0], cms.items()):
        cm = np.asarray(cm)
        ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(top, 1))
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        for (r, c), v in np.ndenumerate(cm):
            ax.text(c, r, str(v), ha="center", va="center", color="white" if v > top / 2 else "black", fontsize=9)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(arm, fontsize=10)
    fig.tight_layout()
    return fig
