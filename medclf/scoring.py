"""Fast NumPy versions of the headline metrics, for bootstrap resampling (thousands of calls).

Each takes (labels N, probabilities N×K) and returns a float (nan where undefined). They agree
with `medclf.metrics.classification_metrics` (scikit-learn), which stays the reference for the
reported point estimates; these only make resampling cheap.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.stats import rankdata

Metric = Callable[[np.ndarray, np.ndarray], float]
HEADLINE = ("accuracy", "balanced_accuracy", "auc", "f1_macro")


def _confusion(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    k = probs.shape[1]
    pred = probs.argmax(1)
    return np.bincount(np.asarray(y) * k + pred, minlength=k * k).reshape(k, k)


def accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    return float(np.mean(probs.argmax(1) == y)) if len(y) else float("nan")


def _recalls(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    support = cm.sum(1)
    return np.diag(cm) / np.maximum(support, 1), support > 0


def balanced_accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    recall, present = _recalls(_confusion(y, probs))
    return float(recall[present].mean()) if present.any() else float("nan")


def f1_macro(y: np.ndarray, probs: np.ndarray) -> float:
    cm = _confusion(y, probs)
    present = cm.sum(1) > 0
    denominator = cm.sum(1) + cm.sum(0)  # 2TP + FP + FN
    f1 = np.where(denominator > 0, 2 * np.diag(cm) / np.maximum(denominator, 1), 0.0)
    return float(f1[present].mean()) if present.any() else float("nan")


def recall_of(c: int) -> Metric:
    """Recall (sensitivity) of class index c."""
    def recall(y: np.ndarray, probs: np.ndarray) -> float:
        positives = y == c
        return float(np.mean(probs[positives].argmax(1) == c)) if positives.any() else float("nan")
    return recall


def _binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    m = int(positive.sum())
    n = len(positive) - m
    if m == 0 or n == 0:
        return float("nan")
    if m * n <= 40_000:  # small samples: count the pairs directly (several times faster than ranking)
        pos, neg = score[positive][:, None], score[~positive][None, :]
        return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (m * n))
    ranks = rankdata(score)  # midranks: ties count one half, as in the ROC area
    return float((ranks[positive].sum() - m * (m + 1) / 2) / (m * n))


def auc(y: np.ndarray, probs: np.ndarray) -> float:
    """Binary ROC AUC on class 1; one-vs-rest macro over the classes present otherwise (as metrics.auc_score)."""
    y = np.asarray(y)
    k = probs.shape[1]
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if k == 2:
        return _binary_auc(y == 1, probs[:, 1])
    cols = probs if len(present) == k else probs[:, present] / probs[:, present].sum(1, keepdims=True)
    columns = present if len(present) == k else np.arange(len(present))
    return float(np.mean([_binary_auc(y == c, cols[:, j]) for c, j in zip(present, columns)]))


def metric_functions(classes: list[str]) -> dict[str, Metric]:
    """The compared metrics by name: the headline four, then recall_<class> for every class."""
    funcs: dict[str, Metric] = {"accuracy": accuracy, "balanced_accuracy": balanced_accuracy, "auc": auc,
                                "f1_macro": f1_macro}
    funcs.update({f"recall_{name}": recall_of(i) for i, name in enumerate(classes)})
    return funcs


def metric_values(metrics: dict, classes: list[str]) -> dict[str, float | None]:
    """The same names read from a metrics.json split entry (scikit-learn values)."""
    values = {name: metrics[name] for name in HEADLINE}
    values.update({f"recall_{name}": metrics["per_class"][name]["recall"] for name in classes})
    return values
