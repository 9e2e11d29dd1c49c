"""Classification metrics (scikit-learn), the validation-chosen threshold, and their JSON form."""
from __future__ import annotations

import math

import numpy as np


def _skm():
    """scikit-learn's metrics, imported on first use (about a second of start-up saved before training)."""
    from sklearn import metrics

    return metrics


def auc_score(y_true: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC: binary on the positive class, one-vs-rest macro for more classes; nan if undefined."""
    skm = _skm()
    k = probs.shape[1]
    present = np.unique(y_true)
    if len(present) < 2:
        return float("nan")
    try:
        if k == 2:
            return float(skm.roc_auc_score(y_true, probs[:, 1]))
        if len(present) < k:  # OvR over the classes present in this split only
            cols = probs[:, present] / probs[:, present].sum(1, keepdims=True)
            return float(skm.roc_auc_score(y_true, cols, multi_class="ovr", average="macro", labels=present))
        return float(skm.roc_auc_score(y_true, probs, multi_class="ovr", average="macro"))
    except ValueError:
        return float("nan")


def youden_threshold(y_true: np.ndarray, positive_prob: np.ndarray) -> float:
    """The probability threshold maximising sensitivity + specificity − 1 (Youden's J)."""
    skm = _skm()
    if len(np.unique(y_true)) < 2:
        return 0.5
    fpr, tpr, thresholds = skm.roc_curve(y_true, positive_prob)
    best = int(np.argmax(tpr - fpr))
    return float(min(max(thresholds[best], 0.0), 1.0))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str],
                           predictions: np.ndarray | None = None) -> dict:
    """Accuracy, balanced accuracy, AUC, macro F1, per-class precision/recall/specificity/F1, confusion matrix."""
    skm = _skm()
    y_true = np.asarray(y_true)
    pred = probs.argmax(1) if predictions is None else np.asarray(predictions)
    labels = np.arange(len(classes))
    cm = skm.confusion_matrix(y_true, pred, labels=labels)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, pred, labels=labels, zero_division=0)
    total = cm.sum()
    per_class = {}
    for i, name in enumerate(classes):
        tn = total - cm[i, :].sum() - cm[:, i].sum() + cm[i, i]
        negatives = total - cm[i, :].sum()
        per_class[name] = {
            "precision": float(precision[i]), "recall": float(recall[i]),
            "specificity": float(tn / negatives) if negatives else float("nan"),
            "f1": float(f1[i]), "support": int(support[i]),
        }
    present = support > 0
    return {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, pred)),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else float("nan"),
        "auc": auc_score(y_true, probs),
        "f1_macro": float(f1[present].mean()) if present.any() else float("nan"),
        "precision_macro": float(precision[present].mean()) if present.any() else float("nan"),
        "recall_macro": float(recall[present].mean()) if present.any() else float("nan"),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def evaluate_predictions(y_true: np.ndarray, probs: np.ndarray, classes: list[str],
                         threshold: float | None = None) -> dict:
    """Metrics at the arg-max decision; for two classes also at `threshold` on P(class 1)."""
    result = classification_metrics(y_true, probs, classes)
    if len(classes) == 2 and threshold is not None:
        at = classification_metrics(y_true, probs, classes, predictions=(probs[:, 1] >= threshold).astype(int))
        result["threshold"] = {"value": threshold, "chosen_on": "val (Youden's J)",
                               **{k: at[k] for k in ("accuracy", "balanced_accuracy", "f1_macro", "per_class", "confusion_matrix")}}
    return result


def json_safe(value):
    """Replace nan/inf by None so metrics.json stays valid JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
