"""Every figure medclf draws: run plots, report figures, comparison figures.

Figures are `matplotlib.figure.Figure` objects on an Agg canvas: no pyplot, no global backend
switch, nothing left open. Text that comes from data (class names, arm names) goes through
`literal`, so a name like `dose$\\foo$` is drawn as written instead of being parsed as mathtext.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

COLORS = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]


def literal(text: object) -> str:
    """Text matplotlib draws as written: every '$' escaped, so no mathtext is parsed."""
    return str(text).replace("$", r"\$")


def new_figure(figsize: tuple[float, float], rows: int = 1, cols: int = 1, **subplots):
    """(Figure on an Agg canvas, its axes)."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, **subplots)


def png_bytes(fig: Figure, dpi: int = 80) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save_png(fig: Figure, path: Path, dpi: int = 110) -> None:
    from ..atomic import write_bytes

    write_bytes(path, png_bytes(fig, dpi))


def read_history(path: Path) -> dict[str, list[float]]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) if r[k] not in ("", "nan", "None") else np.nan for r in rows] for k in (rows[0] if rows else {})}


def curves_figure(history: dict[str, list[float]], title: str = "") -> Figure:
    fig, (ax_loss, ax_metric) = new_figure((10, 4), 1, 2)
    epochs = history.get("epoch", [])
    for key in ("train_loss", "val_loss"):
        if key in history:  # a history from an older or partial run may lack a column
            ax_loss.plot(epochs, history[key], "o-", label=key.replace("_", " "))
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    for key in ("val_accuracy", "val_auc", "val_f1_macro"):
        if key in history:
            ax_metric.plot(epochs, history[key], "o-", label=key.removeprefix("val_"))
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylabel("validation metric")
    ax_metric.legend()
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(literal(title))
    fig.tight_layout()
    return fig


def _draw_confusion(ax, cm: np.ndarray, classes: list[str], top: float, fontsize: float | None = None) -> None:
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(top, 1))
    names = [literal(c) for c in classes]
    ax.set_xticks(range(len(classes)), names, rotation=45, ha="right", fontsize=fontsize)
    ax.set_yticks(range(len(classes)), names, fontsize=fontsize)
    for (r, c), v in np.ndenumerate(cm):
        ax.text(c, r, str(v), ha="center", va="center", color="white" if v > top / 2 else "black", fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")


def confusion_figure(cm: list[list[int]], classes: list[str], title: str = "confusion matrix") -> Figure:
    cm = np.asarray(cm)
    side = max(4.0, 0.6 * len(classes) + 2)
    fig, ax = new_figure((side, side))
    _draw_confusion(ax, cm, classes, int(cm.max()) if cm.size else 0)
    ax.set_title(literal(title))
    fig.tight_layout()
    return fig


def curve_classes(labels: np.ndarray, classes: list[str]):
    """(class index, positives mask) per curve: class 1 for binary, every class (one-vs-rest) otherwise;
    classes without both outcomes in `labels` are skipped (no curve is defined). Multi-label labels (N×L):
    every label, from its own column."""
    if labels.ndim == 2:
        for c in range(len(classes)):
            positives = labels[:, c] == 1
            if positives.any() and not positives.all():
                yield c, positives
        return
    for c in [1] if len(classes) == 2 else range(len(classes)):
        positives = labels == c
        if positives.any() and not positives.all():
            yield c, positives


def _roc_axes(ax, title: str) -> None:
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("1 − specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(literal(title))
    ax.legend(loc="lower right", fontsize=8)


def roc_figure(labels: np.ndarray, probs: np.ndarray, classes: list[str], title: str = "ROC") -> Figure:
    from sklearn.metrics import roc_curve

    fig, ax = new_figure((5, 5))
    for c, positives in curve_classes(labels, classes):
        fpr, tpr, _ = roc_curve(positives, probs[:, c])
        ax.plot(fpr, tpr, label=literal(classes[c]))
    _roc_axes(ax, title)
    fig.tight_layout()
    return fig


def pr_figure(labels: np.ndarray, probs: np.ndarray, classes: list[str], title: str = "precision-recall") -> Figure:
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig, ax = new_figure((5, 5))
    for c, positives in curve_classes(labels, classes):
        precision, recall, _ = precision_recall_curve(positives, probs[:, c])
        ap = average_precision_score(positives, probs[:, c])
        ax.plot(recall, precision, label=f"{literal(classes[c])} (AP {ap:.3f})")
        ax.axhline(positives.mean(), color="grey", lw=0.6, ls=":")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (positive predictive value)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(literal(title))
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def reliability_figure(bins: dict, ece: float, title: str = "calibration") -> Figure:
    """Reliability diagram (accuracy against confidence per bin) over a histogram of the confidences."""
    conf, acc, count = (np.asarray(bins[k]) for k in ("bin_confidence", "bin_accuracy", "bin_count"))
    width = 1.0 / len(count)
    centres = (np.arange(len(count)) + 0.5) * width
    fig, (ax, ax_n) = new_figure((5, 5.6), 2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    used = count > 0
    ax.bar(centres[used], acc[used], width=width * 0.9, color="#2f6fd0", alpha=0.8, label="accuracy in bin")
    ax.plot(conf[used], acc[used], "o", color="#b3261e", ms=3, label="mean confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{literal(title)} (ECE {ece:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    ax_n.bar(centres, count, width=width * 0.9, color="#8a96a3")
    ax_n.set_xlabel("confidence of the predicted class")
    ax_n.set_ylabel("images")
    ax_n.set_xlim(0, 1)
    fig.tight_layout()
    return fig


def arm_curves_figure(histories: dict[str, list[dict[str, list[float]]]]) -> Figure:
    """Validation loss, AUC and accuracy per epoch; one colour per arm, one line per seed."""
    keys = [("val_loss", "validation loss"), ("val_auc", "validation AUC"), ("val_accuracy", "validation accuracy")]
    fig, axes = new_figure((13, 3.8), 1, 3)
    for i, (arm, runs) in enumerate(histories.items()):
        color = COLORS[i % len(COLORS)]
        for j, history in enumerate(runs):
            for ax, (key, _) in zip(axes, keys):
                if key in history and history.get("epoch"):
                    ax.plot(history["epoch"], history[key], "o-", ms=3, color=color, alpha=0.75,
                            label=literal(arm) if j == 0 else None)
    for ax, (_, name) in zip(axes, keys):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def arm_roc_figure(labels: np.ndarray, probs_by_arm: dict[str, np.ndarray], classes: list[str], title: str) -> Figure:
    """One ROC curve per arm: on the positive class (binary) or micro-averaged one-vs-rest (multi-label: over labels)."""
    from sklearn.metrics import roc_curve

    fig, ax = new_figure((5.2, 5))
    k = len(classes)
    for i, (arm, probs) in enumerate(probs_by_arm.items()):
        if labels.ndim == 2:
            fpr, tpr, _ = roc_curve(labels.ravel(), probs.ravel())
        elif k == 2:
            if len(np.unique(labels)) < 2:
                continue
            fpr, tpr, _ = roc_curve(labels == 1, probs[:, 1])
        else:
            onehot = np.eye(k, dtype=bool)[labels]
            fpr, tpr, _ = roc_curve(onehot.ravel(), probs.ravel())
        ax.plot(fpr, tpr, color=COLORS[i % len(COLORS)], label=literal(arm))
    _roc_axes(ax, title + ("" if k == 2 else " (micro-average over classes)"))
    fig.tight_layout()
    return fig


def confusion_grid_figure(cms: dict[str, list[list[int]]], classes: list[str]) -> Figure:
    """Confusion matrices side by side, one per arm, on one colour scale."""
    n = len(cms)
    side = max(3.2, 0.5 * len(classes) + 2)
    fig, axes = new_figure((side * n, side), 1, n, squeeze=False)
    top = max(int(np.max(cm)) for cm in cms.values()) if cms else 1
    for ax, (arm, cm) in zip(axes[0], cms.items()):
        _draw_confusion(ax, np.asarray(cm), classes, top, fontsize=8)
        ax.set_title(literal(arm), fontsize=10)
    fig.tight_layout()
    return fig


def overlay_figure(image: np.ndarray, blend: np.ndarray, title: str) -> Figure:
    """An image and its Grad-CAM overlay side by side under a title."""
    fig = Figure(figsize=(6.0, 3.3), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    left.imshow(image)
    right.imshow(blend)
    for ax, name in ((left, "image"), (right, "Grad-CAM")):
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(literal(title))
    return fig


def save_run_plots(out: Path, history_csv: Path, cm, classes, labels, probs, split: str) -> list[str]:
    """curves.png, confusion_matrix.png (not for multi-label: cm None) and roc.png in the run directory; returns a
    warning per figure that failed.

    A figure that cannot be drawn costs that figure only, never the run's other outputs."""
    figures = {"curves.png": lambda: curves_figure(read_history(history_csv), out.name),
               "confusion_matrix.png": lambda: confusion_figure(cm, classes, f"confusion matrix ({split})"),
               "roc.png": lambda: roc_figure(labels, probs, classes, f"ROC ({split})")}
    if cm is None:
        del figures["confusion_matrix.png"]
    warnings = []
    for name, draw in figures.items():
        try:
            save_png(draw(), out / name)
        except Exception as exc:  # noqa: BLE001  a plot is a bonus: report it, keep the run
            warnings.append(f"{name} not written ({type(exc).__name__}: {str(exc)[:300]})")
    return warnings
