"""metrics.estimate (metrics.json["estimate"]) and oof.csv, the out-of-fold predictions of a --folds run."""
import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from medclf import metrics as M
from medclf.errors import MedclfError
from medclf.oof import read_oof, write_oof
from medclf.stats import bootstrap_ci

HEADLINE_KEYS = {"accuracy", "balanced_accuracy", "auc", "f1_macro"}


def _predictions(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities that are right more often than chance."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    p = rng.dirichlet(np.ones(k), size=n)
    p[np.arange(n), y] += rng.random(n)
    return y, p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("k", [2, 3])
def test_estimate_values_equal_scikit_learn_and_cis_contain_them(k):
    y, p = _predictions(300, k, seed=k)
    est = M.estimate(y, p, [f"c{i}" for i in range(k)], M.METHOD_OOF.format(k=5), n_boot=300)
    assert set(est) == HEADLINE_KEYS | {"method", "n", "warnings"}
    assert est["method"] == "out-of-fold, K=5" and est["n"] == 300 and est["warnings"] == []
    auc = roc_auc_score(y, p[:, 1]) if k == 2 else roc_auc_score(y, p, multi_class="ovr", average="macro")
    reference = {"accuracy": accuracy_score(y, p.argmax(1)), "balanced_accuracy": balanced_accuracy_score(y, p.argmax(1)),
                 "auc": auc, "f1_macro": f1_score(y, p.argmax(1), average="macro")}
    for name, value in reference.items():
        entry = est[name]
        assert set(entry) == {"value", "ci95"}
        assert entry["value"] == pytest.approx(value, abs=1e-12), name
        lo, hi = entry["ci95"]
        assert lo < entry["value"] < hi, name
        assert hi - lo < 0.25, name  # 300 images: a real interval, not [0, 1]


def test_estimate_cis_are_the_bootstrap_of_stats_and_wilson_for_accuracy():
    from scipy.stats import binomtest

    y, p = _predictions(120, 2)
    est = M.estimate(y, p, ["a", "b"], M.METHOD_VAL, n_boot=200, seed=7)
    for name, f in M.metric_functions(["a", "b"]).items():
        if name in HEADLINE_KEYS - {"accuracy"}:
            assert est[name]["ci95"] == list(bootstrap_ci(f, y, p, n_boot=200, seed=7)), name
    wilson = binomtest(int((p.argmax(1) == y).sum()), len(y)).proportion_ci(0.95, method="wilson")
    assert est["accuracy"]["ci95"] == pytest.approx([wilson.low, wilson.high])


def test_optimistic_and_small_estimates_warn():
    y, p = _predictions(250, 2)
    assert M.estimate(y, p, ["a", "b"], M.METHOD_VAL, n_boot=100)["warnings"] == []
    selected = M.estimate(y, p, ["a", "b"], M.METHOD_VAL_SELECTED, n_boot=100)["warnings"]
    assert len(selected) == 1 and "optimistic" in selected[0].lower() and "chose the checkpoint" in selected[0]
    small = M.estimate(y[:M.SMALL_ESTIMATE_N - 1], p[:M.SMALL_ESTIMATE_N - 1], ["a", "b"], M.METHOD_OOF.format(k=3),
                       n_boot=100)
    assert len(small["warnings"]) == 1 and f"{M.SMALL_ESTIMATE_N - 1} images" in small["warnings"][0]
    half = (small["accuracy"]["ci95"][1] - small["accuracy"]["ci95"][0]) / 2
    assert f"accuracy ±{half:.2f}" in small["warnings"][0]
    both = M.estimate(y[:50], p[:50], ["a", "b"], M.METHOD_VAL_SELECTED, n_boot=100)["warnings"]
    assert len(both) == 2 and all(w.count("\n") == 0 for w in both)


def test_estimate_on_one_class_has_no_auc_and_is_json_safe():
    y, p = _predictions(40, 2)
    y[:] = 1
    est = M.estimate(y, p, ["a", "b"], M.METHOD_VAL, n_boot=100)
    assert est["auc"] == {"value": None, "ci95": None}
    assert est["accuracy"]["value"] == pytest.approx(accuracy_score(y, p.argmax(1)))
    assert any("AUC is undefined" in w for w in est["warnings"])
    assert json.loads(json.dumps(est, allow_nan=False)) == est


def test_oof_file_round_trip(tmp_path):
    y, p = _predictions(12, 3)
    ids = [("train" if i < 8 else "val", f"img, {i}.png") for i in range(12)]
    folds = np.arange(12) % 3 + 1
    classes = ["a", "b,c", "prob_d"]
    write_oof(tmp_path / "oof.csv", ids, y, p, folds, classes)
    oof = read_oof(tmp_path)
    assert oof.ids == ids and oof.classes == classes
    np.testing.assert_array_equal(oof.labels, y)
    np.testing.assert_array_equal(oof.folds, folds)
    np.testing.assert_array_equal(oof.probs, p)  # written as repr: exact
    assert read_oof(tmp_path / "elsewhere") is None


@pytest.mark.parametrize("text,message", [
    ("split,id,label,prob_a,prob_b\ntrain,x,a,0.5,0.5\n", "not an out-of-fold file"),
    ("split,id,label,fold,prob_a,prob_b\ntrain,x,z,1,0.5,0.5\n", "known class name"),
    ("split,id,label,fold,prob_a,prob_b\ntrain,x,a,1,0.5\n", "2 probabilities"),
    ("split,id,label,fold,prob_a,prob_b\n", "no rows"),
])
def test_broken_oof_file_is_one_line_error(tmp_path, text, message):
    (tmp_path / "oof.csv").write_text(text)
    with pytest.raises(MedclfError, match=message):
        read_oof(tmp_path)


@pytest.mark.parametrize("multilabel", [False, True])
def test_estimate_from_the_splits_ci95_equals_bootstrapping_again(multilabel):
    """Training passes a split's `ci95` (model_card.headline_intervals) to `estimate` instead of resampling the
    same images twice: the result must be what resampling gives."""
    from medclf.evaluation import choose_threshold
    from medclf.metrics import METHOD_VAL, estimate
    from medclf.model_card import headline_intervals

    rng = np.random.default_rng(3)
    if multilabel:
        y = (rng.random((150, 3)) < 0.4).astype(int)
        p = np.clip(0.4 * y + 0.6 * rng.random((150, 3)), 0, 1)
    else:
        y = rng.integers(0, 2, 150)
        p = rng.dirichlet([1, 1], 150)
        p[np.arange(150), y] += 0.3
        p /= p.sum(1, keepdims=True)
    classes = ["a", "b", "c"][: p.shape[1]]
    cis = headline_intervals(y, p, classes, choose_threshold(y, p))["ci95"]
    assert estimate(y, p, classes, METHOD_VAL, cis=cis) == estimate(y, p, classes, METHOD_VAL)


def test_accuracy_ci_stays_honest_when_the_split_has_no_errors():
    """A perfect split: every bootstrap resample is perfect too (a zero-width interval that no test set can fall
    in), while the Wilson interval keeps the error rate that n images cannot rule out."""
    from scipy.stats import binomtest

    n = 5895  # MedNIST's validation split
    labels = np.arange(n) % 6
    probs = np.eye(6)[labels] * 0.9 + 0.1 / 6
    est = M.estimate(labels, probs, [str(i) for i in range(6)], M.METHOD_VAL, n_boot=200)
    low, high = est["accuracy"]["ci95"]
    expected = binomtest(n, n).proportion_ci(0.95, method="wilson")
    assert est["accuracy"]["value"] == 1.0 and high == pytest.approx(1.0)
    assert low == pytest.approx(expected.low) and 1 - 4.0 / n < low < 1 - 3.5 / n
    one_wrong = probs.copy()
    one_wrong[0] = np.roll(one_wrong[0], 1)
    assert M.headline_ci("accuracy", M.accuracy, labels, one_wrong)[0] < low  # an error widens it


@pytest.mark.parametrize("k", [2, 6])
def test_class_wilson_bounds_keep_the_error_each_class_cannot_rule_out(k):
    """Balanced accuracy, macro F1 and AUC on a perfect split: not the bootstrap's zero-width [1, 1] but a lower
    end from each class's Wilson bound for zero errors; one error brings back the ordinary bootstrap."""
    from scipy.stats import binomtest

    def bound(n: int) -> float:  # the Wilson upper bound of the error rate after 0 errors in n
        return 1 - binomtest(n, n).proportion_ci(0.95, method="wilson").low

    labels = np.repeat(np.arange(k), [60 * (c + 1) for c in range(k)])  # unequal classes: the bound is per class
    probs = np.eye(k)[labels] * 0.9 + 0.1 / k
    n_c = np.bincount(labels)
    est = M.estimate(labels, probs, [str(i) for i in range(k)], M.METHOD_VAL, n_boot=200)
    recall_low = np.mean([1 - bound(int(n)) for n in n_c])
    auc_low = ((1 - bound(int(n_c[1]))) * (1 - bound(int(n_c[0]))) if k == 2 else
               np.mean([(1 - bound(int(n))) * (1 - bound(int(len(labels) - n))) for n in n_c]))
    for name, low in (("balanced_accuracy", recall_low), ("f1_macro", recall_low), ("auc", auc_low)):
        assert est[name]["value"] == 1.0, name
        assert est[name]["ci95"] == pytest.approx([low, 1.0]), name
        assert 0.9 < low < 1.0, name
    funcs = M.metric_functions([str(i) for i in range(k)])
    one_wrong = probs.copy()
    one_wrong[0] = np.roll(one_wrong[0], 1)
    for name in ("balanced_accuracy", "f1_macro", "auc"):
        # one error: the bootstrap, its lower end no higher than the bound with that error; never narrower than none
        low, high = M.headline_ci(name, funcs[name], labels, one_wrong, n_boot=200)
        boot = bootstrap_ci(funcs[name], labels, one_wrong, n_boot=200)
        with_error = M.class_wilson_bound(name, labels, k, one_wrong.argmax(1))[0]
        assert high == boot[1] and low == min(boot[0], with_error), name
        assert with_error < est[name]["ci95"][0] and low < est[name]["ci95"][0], name
    many_wrong = probs.copy()
    many_wrong[:M.FEW_ERRORS] = np.roll(many_wrong[:M.FEW_ERRORS], 1, axis=1)  # enough errors: the plain bootstrap
    assert M.headline_ci("f1_macro", funcs["f1_macro"], labels, many_wrong, n_boot=200) == \
        bootstrap_ci(funcs["f1_macro"], labels, many_wrong, n_boot=200)


def test_a_nearly_perfect_auc_is_not_given_a_zero_width_interval():
    """MedNIST-like: 5,895 images, one wrong, AUC just below 1. The bootstrap alone gave [0.9999993, 1], which a
    new sample's 0.99998 fell outside; the interval now reaches at least as low as with no error at all."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 5895 // 6 + 1)[:5895]
    probs = np.eye(6)[labels] * 0.9 + 0.1 / 6 + rng.uniform(0, 0.01, (5895, 6))
    probs[0] = np.roll(probs[0], 1)  # one image scored as the next class
    probs /= probs.sum(1, keepdims=True)
    auc = M.metric_functions([str(i) for i in range(6)])["auc"]
    assert 0.9999 < auc(labels, probs) < 1.0
    assert bootstrap_ci(auc, labels, probs, n_boot=200)[0] > 0.9995  # what was reported before
    low, high = M.headline_ci("auc", auc, labels, probs, n_boot=200)
    assert high == 1.0 or high == pytest.approx(1.0)
    assert low <= M.class_wilson_bound("auc", labels, 6)[0] < 0.999
