import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from medclf.serialize import json_safe
from medclf.metrics import (HEADLINE, classification_metrics, evaluate_predictions, metric_functions,
                            youden_threshold)


def test_binary_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    m = classification_metrics(y, probs, ["neg", "pos"])
    pred = probs.argmax(1)
    assert m["accuracy"] == skm.accuracy_score(y, pred)
    assert np.isclose(m["balanced_accuracy"], skm.balanced_accuracy_score(y, pred))
    assert np.isclose(m["auc"], skm.roc_auc_score(y, p1))
    assert np.isclose(m["f1_macro"], skm.f1_score(y, pred, average="macro"))
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert np.isclose(m["per_class"]["pos"]["recall"], tp / (tp + fn))
    assert np.isclose(m["per_class"]["pos"]["specificity"], tn / (tn + fp))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()


def test_multiclass_auc_ovr_macro():
    rng = np.random.default_rng(1)
    y = np.arange(90) % 3
    probs = rng.dirichlet(np.ones(3), 90)
    probs[np.arange(90), y] += 0.5
    probs /= probs.sum(1, keepdims=True)
    m = classification_metrics(y, probs, ["a", "b", "c"])
    assert np.isclose(m["auc"], skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert sum(c["support"] for c in m["per_class"].values()) == 90


def test_youden_threshold_separates_perfectly():
    y = np.array([0, 0, 0, 1, 1, 1])
    score = np.array([0.1, 0.2, 0.3, 0.35, 0.8, 0.9])
    t = youden_threshold(y, score)
    assert 0.3 < t <= 0.35
    probs = np.stack([1 - score, score], 1)
    m = evaluate_predictions(y, probs, ["n", "p"], threshold=t)
    assert m["threshold"]["accuracy"] == 1.0 and m["accuracy"] < 1.0


def test_single_class_auc_is_none_in_json():
    m = json_safe(classification_metrics(np.zeros(4, int), np.full((4, 2), 0.5), ["a", "b"]))
    assert m["auc"] is None


def _random_case(k: int, absent: tuple[int, ...], seed: int, n: int = 60):
    rng = np.random.default_rng(seed)
    present = [c for c in range(k) if c not in absent]
    y = rng.choice(present, n)
    probs = rng.dirichlet(np.ones(k), n)
    probs[:4] = probs[4]  # ties
    return y, probs


def _sklearn_auc(y, probs):
    """The documented definition, from scikit-learn: OvR macro over the classes present, each by its own column."""
    present = np.unique(y)
    if probs.shape[1] == 2:
        return skm.roc_auc_score(y, probs[:, 1])
    return np.mean([skm.roc_auc_score(y == c, probs[:, c]) for c in present])


@pytest.mark.parametrize("k,absent,seed", [(2, (), 0), (3, (), 1), (3, (2,), 2), (4, (1, 3), 3), (5, (0,), 4)]
                         + [(3, (1,), s) for s in range(5, 10)])
def test_metrics_equal_scikit_learn_with_and_without_absent_classes(k, absent, seed):
    y, probs = _random_case(k, absent, seed)
    pred = probs.argmax(1)
    classes = [f"c{i}" for i in range(k)]
    m = classification_metrics(y, probs, classes)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns about predicted classes that are absent from y
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
        for name in ("f1", "precision", "recall"):
            reference = getattr(skm, f"{name}_score")(y, pred, average="macro", zero_division=0)
            assert m[f"{name}_macro"] == pytest.approx(reference, abs=1e-12), name
        p, r, f, support = skm.precision_recall_fscore_support(y, pred, labels=range(k), zero_division=0)
    assert m["auc"] == pytest.approx(_sklearn_auc(y, probs), abs=1e-12)
    if len(absent) == 0 and k > 2:
        assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-12)
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=range(k)).tolist()
    for i, name in enumerate(classes):
        pc = m["per_class"][name]
        assert (pc["precision"], pc["f1"], pc["support"]) == pytest.approx((p[i], f[i], support[i]), abs=1e-12)
        assert np.isnan(pc["recall"]) if i in absent else pc["recall"] == pytest.approx(r[i], abs=1e-12)
    # the bootstrap and compare call the same functions
    funcs = metric_functions(classes)
    for name in HEADLINE:
        assert funcs[name](y, probs) == pytest.approx(m[name], abs=1e-12, nan_ok=True), name


def test_predicting_an_absent_class_is_penalised():
    """The issue's case: a 3-class model, two classes in the labels, one image wrongly put in the absent class."""
    y = np.array([0, 0, 1, 1])
    probs = np.eye(3)[[0, 2, 1, 1]] * 0.8 + 0.2 / 3
    m = classification_metrics(y, probs, ["a", "b", "c"])
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, probs.argmax(1), average="macro")) == pytest.approx(5 / 9)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["auc"] == pytest.approx(np.mean([skm.roc_auc_score(y == c, probs[:, c]) for c in (0, 1)]))
    assert json_safe(m)["per_class"]["c"]["recall"] is None and m["per_class"]["c"]["precision"] == 0.0
