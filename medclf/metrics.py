"""Classification metrics: the one implementation behind metrics.json, history.csv, the report and compare.

Every metric takes (labels N, probabilities N×K over the model's K classes); the decision is the most
probable class. They are NumPy on the confusion matrix, fast enough for thousands of bootstrap
resamples, and tested equal to scikit-learn. Classes the model knows but the images lack:

- macro F1, precision and recall average over the classes that occur in the labels OR the
  predictions (scikit-learn's default), so predicting a class that is absent is penalised;
- balanced accuracy is the mean recall over the classes present in the labels
  (`sklearn.metrics.balanced_accuracy_score`);
- ROC AUC is the one-vs-rest macro average over the model's classes present in the labels, each
  class scored by its own probability; binary models: the AUC of P(class 1). Defined when at
  least two classes occur, NaN (null in JSON) otherwise;
- per class, recall (sensitivity) of a class without images is NaN; precision of a class never
  predicted and F1 where precision and recall are both zero are 0 (scikit-learn's zero_division=0).

Multi-label tasks (labels N×L of 0/1, probabilities N×L of independent sigmoids) have their own section
below (`multilabel_metrics`): per label AUC, average precision and the rates at a per-label threshold,
plus macro and micro AUC.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .serialize import json_safe
from .stats import bootstrap_ci

Metric = Callable[[np.ndarray, np.ndarray], float]
HEADLINE = ("accuracy", "balanced_accuracy", "auc", "f1_macro")

# How the images behind an estimate relate to training (metrics.json["estimate"]["method"]).
METHOD_OOF = "out-of-fold, K={k}"
METHOD_VAL = "validation, not used for selection"
METHOD_VAL_SELECTED = "validation, used for selection: optimistic"
# Below this many images an estimate's intervals are too wide to tell models a few points apart: the 95%
# interval of an accuracy near 0.9 spans about ±0.06 at 100 images and shrinks only with the square root of n.
SMALL_ESTIMATE_N = 200


def confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """K×K counts: rows are the true class, columns the predicted class."""
    return np.bincount(np.asarray(y) * k + np.asarray(pred), minlength=k * k).reshape(k, k)


def weighted_confusion(y: np.ndarray, pred: np.ndarray, k: int, weights: np.ndarray) -> np.ndarray:
    """B×K×K confusion matrices, image i counted weights[b, i] times in matrix b (a bootstrap resample's
    multiplicities; all ones is the plain confusion matrix)."""
    cell = np.asarray(y) * k + np.asarray(pred)
    cells, sums = _group_sums(weights, cell)
    out = np.zeros((len(weights), k * k))
    out[:, cells] = sums
    return out.reshape(len(weights), k, k)


def _group_sums(weights: np.ndarray, keys: np.ndarray, rows: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """The distinct keys in ascending order, and per row of weights (B×N) the weight summed over each key,
    counting only the images where `rows` (a boolean mask) is true. One sparse product: no B×N copies."""
    from scipy.sparse import csr_matrix  # imported where used: `import medclf` stays light

    distinct, inverse = np.unique(np.asarray(keys), return_inverse=True)
    take = np.ones(len(inverse), dtype=bool) if rows is None else np.asarray(rows, dtype=bool)
    member = csr_matrix((np.ones(int(take.sum())), (np.flatnonzero(take), inverse[take])),
                        shape=(len(inverse), len(distinct)))
    return distinct, np.asarray(weights @ member)


def _ratio(num: np.ndarray, den: np.ndarray, undefined: float) -> np.ndarray:
    return np.where(den > 0, num / np.maximum(den, 1), undefined)


def class_rates(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1, specificity and support from a K×K (or B×K×K) confusion matrix."""
    tp, actual, predicted = np.diagonal(cm, axis1=-2, axis2=-1), cm.sum(-1), cm.sum(-2)
    negatives = cm.sum((-2, -1))[..., None] - actual
    return {"precision": _ratio(tp, predicted, 0.0), "recall": _ratio(tp, actual, np.nan),
            "f1": _ratio(2 * tp, actual + predicted, 0.0),
            "specificity": _ratio(negatives - (predicted - tp), negatives, np.nan), "support": actual}


def _mean_over(values: np.ndarray, used: np.ndarray) -> np.ndarray:
    n = used.sum(-1)
    return np.where(n > 0, np.where(used, values, 0.0).sum(-1) / np.maximum(n, 1), np.nan)


def _macro(cm: np.ndarray, rate: str) -> np.ndarray:
    """Mean of a per-class rate over the classes in the labels or the predictions."""
    used = (cm.sum(-1) > 0) | (cm.sum(-2) > 0)
    return _mean_over(np.nan_to_num(class_rates(cm)[rate]), used)  # a predicted class without images: recall 0


def _balanced_accuracy(cm: np.ndarray) -> np.ndarray:
    return _mean_over(np.nan_to_num(class_rates(cm)["recall"]), cm.sum(-1) > 0)


def _from_weights(on_weights: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]) -> Metric:
    """A metric of (labels, probabilities) from its weighted form, which `stats.bootstrap_ci` evaluates on a
    thousand resamples at once (`metric.on_weights(y, probs, weights B×N)` → B values)."""
    def metric(y: np.ndarray, probs: np.ndarray) -> float:
        y, probs = np.asarray(y), np.asarray(probs)
        return float(on_weights(y, probs, np.ones((1, len(y))))[0])
    metric.on_weights = on_weights
    metric.__name__ = on_weights.__name__
    return metric


def _cm(y: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return weighted_confusion(y, probs.argmax(1), probs.shape[1], weights)


@_from_weights
def accuracy(y: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    total = weights.sum(1)
    correct = weights @ (probs.argmax(1) == y).astype(float)
    return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


@_from_weights
def balanced_accuracy(y: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return _balanced_accuracy(_cm(y, probs, weights))


@_from_weights
def f1_macro(y: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return _macro(_cm(y, probs, weights), "f1")


def weighted_auc(positive: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of `score` for the boolean `positive`, image i counted weights[b, i] times (B values); ties count
    one half (the Mann-Whitney statistic over tied score groups). NaN without both outcomes."""
    positive = np.asarray(positive, dtype=bool)
    _, pos = _group_sums(weights, score, positive)
    _, neg = _group_sums(weights, score, ~positive)
    below = np.cumsum(neg, axis=1) - neg  # negatives scored lower than each score group
    m, n = pos.sum(1), neg.sum(1)
    wins = (pos * (below + 0.5 * neg)).sum(1)
    return np.where((m > 0) & (n > 0), wins / np.maximum(m * n, 1e-300), np.nan)


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of `score` for the boolean `positive`; ties count one half. NaN without both outcomes."""
    return float(weighted_auc(positive, score, np.ones((1, len(positive))))[0])


@_from_weights
def auc(y: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest macro ROC AUC over the classes present in y (binary: the AUC of P(class 1))."""
    if probs.shape[1] == 2:  # the AUCs of class 0 and class 1 are equal; class 1's is the one reported
        return weighted_auc(y == 1, probs[:, 1], weights)
    present = np.stack([weights @ (y == c).astype(float) > 0 for c in range(probs.shape[1])], axis=1)
    aucs = np.stack([weighted_auc(y == c, probs[:, c], weights) if present[:, c].any() else
                     np.full(len(weights), np.nan) for c in range(probs.shape[1])], axis=1)
    return np.where(present.sum(1) >= 2, _mean_over(np.nan_to_num(aucs), present), np.nan)


def recall_of(c: int) -> Metric:
    """Recall (sensitivity) of class index c; NaN without images of c."""
    def recall(y: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return class_rates(_cm(y, probs, weights))["recall"][:, c]
    return _from_weights(recall)


def specificity_of(c: int) -> Metric:
    """Specificity of class index c (recall of "not c"); NaN without images of other classes."""
    def specificity(y: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return class_rates(_cm(y, probs, weights))["specificity"][:, c]
    return _from_weights(specificity)


def metric_functions(classes: list[str], multilabel: bool = False) -> dict[str, Metric]:
    """The compared metrics by name: the headline four, then recall_<class> for every class.
    Multi-label: the threshold-free ones (macro and micro AUC, macro AP), then auc_<label> for every label."""
    if multilabel:  # label accuracy needs each run's own thresholds: the compared metrics are threshold-free
        return {name: f for name, f in multilabel_functions(classes).items() if name != "accuracy"}
    funcs: dict[str, Metric] = {"accuracy": accuracy, "balanced_accuracy": balanced_accuracy, "auc": auc,
                                "f1_macro": f1_macro}
    funcs.update({f"recall_{name}": recall_of(i) for i, name in enumerate(classes)})
    return funcs


def metric_values(metrics: dict, classes: list[str]) -> dict[str, float | None]:
    """The same names read from a metrics.json split entry."""
    if "per_label" in metrics:
        values = {name: metrics[name] for name in MULTILABEL_COMPARED}
        values.update({f"auc_{name}": metrics["per_label"][name]["auc"] for name in classes})
        return values
    values = {name: metrics[name] for name in HEADLINE}
    values.update({f"recall_{name}": metrics["per_class"][name]["recall"] for name in classes})
    return values


def youden_threshold(y_true: np.ndarray, positive_prob: np.ndarray) -> float:
    """The probability threshold maximising sensitivity + specificity − 1 (Youden's J)."""
    from sklearn.metrics import roc_curve  # imported on first use: slow to import

    if len(np.unique(y_true)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(y_true, positive_prob)
    best = int(np.argmax(tpr - fpr))
    return float(min(max(thresholds[best], 0.0), 1.0))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str],
                           predictions: np.ndarray | None = None) -> dict:
    """Accuracy, balanced accuracy, AUC, macro F1/precision/recall, per-class rates, confusion matrix.

    `predictions` replaces the arg-max decision (e.g. a threshold); AUC always uses `probs`."""
    y_true = np.asarray(y_true)
    pred = probs.argmax(1) if predictions is None else np.asarray(predictions)
    cm = confusion(y_true, pred, len(classes))
    rates = class_rates(cm)
    per_class = {name: {"precision": float(rates["precision"][i]), "recall": float(rates["recall"][i]),
                        "specificity": float(rates["specificity"][i]), "f1": float(rates["f1"][i]),
                        "support": int(rates["support"][i])} for i, name in enumerate(classes)}
    return {
        "n": int(len(y_true)),
        "accuracy": float(np.mean(pred == y_true)) if len(y_true) else float("nan"),
        "balanced_accuracy": float(_balanced_accuracy(cm)),
        "auc": auc(y_true, probs),
        "f1_macro": float(_macro(cm, "f1")),
        "precision_macro": float(_macro(cm, "precision")),
        "recall_macro": float(_macro(cm, "recall")),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def evaluate_predictions(y_true: np.ndarray, probs: np.ndarray, classes: list[str],
                         threshold: float | None = None, chosen_on: str = "val") -> dict:
    """Metrics at the arg-max decision; for two classes also at `threshold` on P(class 1).
    Multi-label labels (N×L): `multilabel_metrics` at the per-label thresholds (a list; None: 0.5 each)."""
    if np.ndim(y_true) == 2:
        return multilabel_metrics(y_true, probs, classes, threshold, chosen_on)
    result = classification_metrics(y_true, probs, classes)
    if len(classes) == 2 and threshold is not None:
        at = classification_metrics(y_true, probs, classes, predictions=(probs[:, 1] >= threshold).astype(int))
        result["threshold"] = {"value": threshold, "chosen_on": f"{chosen_on} (Youden's J)",
                               **{k: at[k] for k in ("accuracy", "balanced_accuracy", "f1_macro", "per_class", "confusion_matrix")}}
    return result



def headline_ci(name: str, func: Metric, labels: np.ndarray, probs: np.ndarray, n_boot: int = 1000,
                seed: int = 0) -> tuple[float, float]:
    """The 95% CI every page and file reports for a headline metric: for single-label accuracy (a proportion
    of images) the Wilson interval; balanced accuracy, macro F1 and AUC on a split they find perfect, the bound of
    `class_wilson_bound`; else the percentile bootstrap over images, its lower end taken down to that bound (with
    the errors seen) where there are fewer than FEW_ERRORS errors: resampling a handful of errors cannot show
    how many new data would bring (one error made the interval narrower than none did)."""
    from .stats import proportion_ci

    labels, probs = np.asarray(labels), np.asarray(probs)
    if name == "accuracy" and labels.ndim == 1:
        return proportion_ci(int((probs.argmax(1) == labels).sum()), len(labels))
    bounded = labels.ndim == 1 and name in PERFECT_SPLIT_BOUND
    if bounded and _perfect_for(name, func, labels, probs):
        return class_wilson_bound(name, labels, probs.shape[1])
    low, high = bootstrap_ci(func, labels, probs, n_boot=n_boot, seed=seed)
    predicted = probs.argmax(1) if bounded else None
    if bounded and (predicted != labels).sum() < FEW_ERRORS:
        low = min(low, class_wilson_bound(name, labels, probs.shape[1], predicted)[0])
    return low, high


PERFECT_SPLIT_BOUND = ("balanced_accuracy", "f1_macro", "auc")
FEW_ERRORS = 5  # wrong images below which the bootstrap is too narrow (a normal approximation's usual ≥ 5 events)


def _perfect_for(name: str, func: Metric, labels: np.ndarray, probs: np.ndarray) -> bool:
    """No errors for this metric: every image predicted right (AUC: the classes' scores fully separated)."""
    if name == "auc":
        return bool(func(labels, probs) == 1.0)
    return bool((probs.argmax(1) == labels).all())


def class_wilson_bound(name: str, labels: np.ndarray, k: int, predicted: np.ndarray | None = None
                       ) -> tuple[float, float]:
    """The 95% interval of a metric that is perfect on these images. Every bootstrap resample of a perfect split
    is perfect too, so the bootstrap's interval has zero width; instead each class's error rate is bounded by
    the Wilson interval of zero errors on its n_c images (about 3.8/n_c): balanced accuracy and macro F1 are at
    least the mean over classes of 1 − that bound, and a one-vs-rest AUC at least (1 − e_class)(1 − e_rest): the
    share of pairs still ordered right when those shares of each side cross the separating threshold.
    `predicted` (argmax classes): bound with the errors seen in each class instead of none."""
    from .stats import proportion_ci

    labels = labels.astype(int)
    wrong = np.zeros(len(labels), bool) if predicted is None else np.asarray(predicted) != labels

    def error_bound(members: np.ndarray) -> float:
        n = int(members.sum())
        return 1.0 - proportion_ci(n - int((wrong & members).sum()), n)[0]

    counts = np.bincount(labels, minlength=k)
    present = [c for c in range(k) if counts[c] > 0]
    if name == "auc":
        ordered = [(1 - error_bound(labels == c)) * (1 - error_bound(labels != c))
                   for c in ([1] if k == 2 else present)]
        return float(np.mean(ordered)), 1.0
    return float(np.mean([1 - error_bound(labels == c) for c in present])), 1.0


def estimate(labels: np.ndarray, probs: np.ndarray, classes: list[str], method: str, n_boot: int = 1000,
             seed: int = 0, cis: dict | None = None) -> dict:
    """What to expect on new images from the same source: each headline metric with its 95% percentile
    bootstrap CI, the `method` (METHOD_OOF, METHOD_VAL or METHOD_VAL_SELECTED), n and one-line warnings.
    `cis`: the same images' headline CIs already bootstrapped (a metrics.json split's `ci95`, same n_boot and
    seed), used instead of resampling again.

    Undefined metrics (AUC with one class) have value and ci95 None; the result is JSON-safe."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    if labels.ndim == 2:  # multi-label: at the thresholds chosen on these images, as metrics.json reports them
        funcs, names = multilabel_functions(classes, label_thresholds(labels, probs)), MULTILABEL_HEADLINE
    else:
        funcs, names = metric_functions(classes), HEADLINE
    result: dict = {"method": method, "n": int(len(labels))}
    for name in names:
        value = funcs[name](labels, probs)
        if cis is None:
            ci = headline_ci(name, funcs[name], labels, probs, n_boot=n_boot, seed=seed)
        else:
            ci = tuple(cis[name]) if cis[name] is not None else (float("nan"), float("nan"))
        defined = np.isfinite(value) and all(np.isfinite(ci))
        result[name] = {"value": value, "ci95": list(ci) if defined else None}
    result["warnings"] = estimate_warnings(result)
    return json_safe(result)


def estimate_warnings(est: dict) -> list[str]:
    """One sentence per reason to distrust an estimate: its images chose the checkpoint, too few images, no AUC."""
    warnings = []
    if est["method"] == METHOD_VAL_SELECTED:
        warnings.append("Optimistic: these validation images also chose the checkpoint (the best epoch), "
                        "so expect somewhat lower values on new images.")
    if est["n"] < SMALL_ESTIMATE_N:
        ci = est["accuracy"]["ci95"]
        width = f" (accuracy ±{(ci[1] - ci[0]) / 2:.2f})" if ci is not None else ""
        warnings.append(f"Small sample: the estimate rests on {est['n']} images (fewer than {SMALL_ESTIMATE_N}), "
                        f"so its 95% intervals are wide{width}.")
    if not np.isfinite(est["auc"]["value"]):
        warnings.append("ROC AUC is undefined: the images hold only one class.")
    return warnings


# ---- multi-label tasks: labels N×L of 0/1, probabilities N×L (one sigmoid per label) ----
# "accuracy" is the mean over labels of each label's accuracy at its threshold (MedMNIST's ACC for ChestMNIST);
# "auc" the macro mean of the per-label AUCs over the labels with both outcomes; "auc_micro" the AUC of every
# (image, label) pair pooled. Per-label thresholds maximise Youden's J on validation (0.5 where none is given).
MULTILABEL_HEADLINE = ("auc", "auc_micro", "average_precision_macro", "accuracy")
MULTILABEL_COMPARED = ("auc", "auc_micro", "average_precision_macro")


def average_precision(positive: np.ndarray, score: np.ndarray) -> float:
    """Average precision (area under the step precision-recall curve, scikit-learn's definition); NaN without positives."""
    if not positive.any():
        return float("nan")
    order = np.argsort(-score, kind="mergesort")
    ranked, hits = score[order], positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # tied scores form one threshold
    tp = np.cumsum(hits)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall_gain = np.diff(np.r_[0, tp]) / tp[-1]
    return float((recall_gain * precision).sum())


def label_aucs(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    return np.array([binary_auc(y[:, j] == 1, probs[:, j]) for j in range(y.shape[1])])


def macro_auc(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean per-label AUC over the labels with positives and negatives; NaN when none has both."""
    aucs = label_aucs(y, probs)
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")


def micro_auc(y: np.ndarray, probs: np.ndarray) -> float:
    return binary_auc(np.asarray(y).ravel() == 1, np.asarray(probs).ravel())


def macro_average_precision(y: np.ndarray, probs: np.ndarray) -> float:
    values = np.array([average_precision(y[:, j] == 1, probs[:, j]) for j in range(y.shape[1])])
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def label_thresholds(y: np.ndarray, probs: np.ndarray) -> list[float]:
    """Each label's threshold maximising Youden's J (sensitivity + specificity − 1); 0.5 for a label lacking either outcome."""
    return [youden_threshold(y[:, j], probs[:, j]) for j in range(y.shape[1])]


def decided_labels(probs: np.ndarray, thresholds: list[float] | None) -> np.ndarray:
    """N×L 0/1: a label is present where its probability reaches its threshold (0.5 without thresholds)."""
    cut = np.full(probs.shape[1], 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    return (probs >= cut).astype(np.int64)


def label_accuracy(thresholds: list[float] | None = None) -> Metric:
    def accuracy(y: np.ndarray, probs: np.ndarray) -> float:
        return float(np.mean(decided_labels(probs, thresholds) == y)) if len(y) else float("nan")
    return accuracy


def auc_of_label(j: int) -> Metric:
    def auc(y: np.ndarray, probs: np.ndarray) -> float:
        return binary_auc(y[:, j] == 1, probs[:, j])
    return auc


def multilabel_functions(classes: list[str], thresholds: list[float] | None = None) -> dict[str, Metric]:
    """Multi-label metrics by name: macro/micro AUC, macro AP, label accuracy, then auc_<label> per label."""
    funcs: dict[str, Metric] = {"auc": macro_auc, "auc_micro": micro_auc, "average_precision_macro": macro_average_precision,
                                "accuracy": label_accuracy(thresholds)}
    funcs.update({f"auc_{name}": auc_of_label(j) for j, name in enumerate(classes)})
    return funcs


def _label_rates(y: np.ndarray, decided: np.ndarray) -> dict[str, np.ndarray]:
    """Per label (columns): sensitivity, specificity, precision, F1 and support, NaN/0 as for single-label classes."""
    tp = (decided & y).sum(0)
    positives, predicted = y.sum(0), decided.sum(0)
    negatives = len(y) - positives
    return {"sensitivity": _ratio(tp, positives, np.nan),
            "specificity": _ratio(negatives - (predicted - tp), negatives, np.nan),
            "precision": _ratio(tp, predicted, 0.0), "f1": _ratio(2 * tp, positives + predicted, 0.0),
            "support": positives}


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def multilabel_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str],
                       thresholds: list[float] | None = None, chosen_on: str = "val") -> dict:
    """metrics.json entry of a multi-label split: the headline (macro AUC as "auc"), then one row per label."""
    y = np.asarray(y_true).astype(np.int64)
    decided = decided_labels(probs, thresholds)
    rates = _label_rates(y, decided)
    aucs = label_aucs(y, probs)
    cut = [0.5] * len(classes) if thresholds is None else [float(t) for t in thresholds]
    per_label = {name: {"auc": float(aucs[j]), "average_precision": average_precision(y[:, j] == 1, probs[:, j]),
                        "threshold": cut[j], "sensitivity": float(rates["sensitivity"][j]),
                        "specificity": float(rates["specificity"][j]), "precision": float(rates["precision"][j]),
                        "f1": float(rates["f1"][j]), "support": int(rates["support"][j])}
                 for j, name in enumerate(classes)}
    balanced = (rates["sensitivity"] + rates["specificity"]) / 2
    return {
        "task": "multi-label", "n": int(len(y)),
        "accuracy": float(np.mean(decided == y)) if len(y) else float("nan"),
        "exact_match": float(np.mean((decided == y).all(1))) if len(y) else float("nan"),
        "balanced_accuracy": _nanmean(balanced),
        "auc": macro_auc(y, probs), "auc_micro": micro_auc(y, probs),
        "average_precision_macro": macro_average_precision(y, probs),
        "f1_macro": float(rates["f1"].mean()),
        "sensitivity_macro": _nanmean(rates["sensitivity"]), "specificity_macro": _nanmean(rates["specificity"]),
        "thresholds": "0.5 per label" if thresholds is None else f"per label, chosen on {chosen_on} (Youden's J)",
        "per_label": per_label,
    }
