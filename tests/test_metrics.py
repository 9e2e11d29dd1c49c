import numpy as np
from sklearn import metrics as skm

from medclf.metrics import classification_metrics, evaluate_predictions, json_safe, youden_threshold


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
