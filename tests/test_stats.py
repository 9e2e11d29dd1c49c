"""Tests for medclf.stats on cases with known answers."""

import math

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import accuracy_score, roc_auc_score

from medclf.stats import (
    bootstrap_ci,
    delong_auc_test,
    expected_calibration_error,
    mcnemar_test,
    mean_std,
    paired_bootstrap_diff,
    reliability_bins,
    sampled_test_accuracy_range,
)


def _paired(b: int, c: int, both: int = 5, neither: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Correctness arrays with b (A right, B wrong) and c (A wrong, B right) discordant pairs."""
    a = [True] * b + [False] * c + [True] * both + [False] * neither
    bb = [False] * b + [True] * c + [True] * both + [False] * neither
    return np.array(a), np.array(bb)


def _binary_case(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels plus a strong and a weaker correlated score."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    common = rng.normal(size=n)
    a = y * 1.0 + common + 0.8 * rng.normal(size=n)
    b = y * 0.6 + common + 0.8 * rng.normal(size=n)
    return y, a, b


def _fast_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Rank-based (Mann-Whitney) AUC, much faster than sklearn for bootstrap loops."""
    m = int(y.sum())
    n = y.size - m
    if m == 0 or n == 0:
        raise ValueError("AUC undefined with one class")
    return float((sps.rankdata(s)[y == 1].sum() - m * (m + 1) / 2) / (m * n))


def _brute_delong_var(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """O(mn) DeLong variance of auc_a - auc_b from the definition (psi kernel)."""
    comps = []
    for s in (a, b):
        x, z = s[y == 1], s[y == 0]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        comps.append((psi.mean(axis=1), psi.mean(axis=0)))
    m, n = (y == 1).sum(), (y == 0).sum()
    s10 = np.cov(np.vstack([comps[0][0], comps[1][0]]))
    s01 = np.cov(np.vstack([comps[0][1], comps[1][1]]))
    cov = s10 / m + s01 / n
    return cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]


# --- McNemar -----------------------------------------------------------------


def test_mcnemar_exact_matches_binomtest():
    a, b = _paired(10, 0)
    assert mcnemar_test(a, b) == pytest.approx(sps.binomtest(10, 10, 0.5).pvalue)
    assert mcnemar_test(a, b) == pytest.approx(2 / 2**10)


def test_mcnemar_identical_arms_is_one():
    a = np.array([True, False, True, True, False])
    assert mcnemar_test(a, a.copy()) == 1.0


def test_mcnemar_chi_square_branch_hand_computed():
    a, b = _paired(30, 10)
    statistic = (abs(30 - 10) - 1) ** 2 / 40  # 9.025
    expected = math.erfc(math.sqrt(statistic / 2))  # chi2(1) survival function
    assert mcnemar_test(a, b) == pytest.approx(expected, rel=1e-9)
    assert mcnemar_test(a, b) == pytest.approx(0.0026635, abs=1e-6)


def test_mcnemar_branch_switch_and_symmetry():
    a24, b24 = _paired(16, 8)
    assert mcnemar_test(a24, b24) == pytest.approx(sps.binomtest(16, 24, 0.5).pvalue)
    a25, b25 = _paired(17, 8)
    assert mcnemar_test(a25, b25) == pytest.approx(sps.chi2.sf(8**2 / 25, 1))
    assert mcnemar_test(b25, a25) == pytest.approx(mcnemar_test(a25, b25))


# --- DeLong ------------------------------------------------------------------


def test_delong_difference_matches_sklearn():
    y, a, b = _binary_case()
    diff, p, (lo, hi) = delong_auc_test(y, a, b)
    assert diff == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-12)
    assert 0.0 < p < 1.0
    assert lo < diff < hi


def test_delong_handles_ties_like_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 80)
    a = rng.integers(0, 4, 80) + y
    b = rng.integers(0, 3, 80)
    diff, _, (lo, hi) = delong_auc_test(y, a, b)
    assert diff == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-12)
    se = (hi - lo) / (2 * sps.norm.ppf(0.975))
    assert se**2 == pytest.approx(_brute_delong_var(y, a, b), rel=1e-9)


def test_delong_variance_matches_brute_force():
    y, a, b = _binary_case(n=120, seed=1)
    diff, p, (lo, hi) = delong_auc_test(y, a, b)
    se = (hi - lo) / (2 * sps.norm.ppf(0.975))
    brute_var = _brute_delong_var(y, a, b)
    assert se**2 == pytest.approx(brute_var, rel=1e-9)
    assert p == pytest.approx(2 * sps.norm.sf(abs(diff) / math.sqrt(brute_var)), rel=1e-9)


def test_delong_identical_scores():
    y, a, _ = _binary_case(n=50)
    assert delong_auc_test(y, a, a.copy()) == (0.0, 1.0, (0.0, 0.0))


def test_delong_is_antisymmetric():
    y, a, b = _binary_case(n=100, seed=2)
    d1, p1, (lo1, hi1) = delong_auc_test(y, a, b)
    d2, p2, (lo2, hi2) = delong_auc_test(y, b, a)
    assert d2 == pytest.approx(-d1)
    assert p2 == pytest.approx(p1)
    assert (lo2, hi2) == pytest.approx((-hi1, -lo1))


def test_delong_rejects_non_binary_labels():
    with pytest.raises(ValueError):
        delong_auc_test(np.array([0, 1, 2, 1]), np.arange(4.0), np.arange(4.0))
    with pytest.raises(ValueError):
        delong_auc_test(np.ones(4, int), np.arange(4.0), np.arange(4.0))


def test_delong_agrees_loosely_with_paired_bootstrap():
    y, a, b = _binary_case(n=300, seed=4)
    d_dl, p_dl, (lo_dl, hi_dl) = delong_auc_test(y, a, b)
    d_bs, (lo_bs, hi_bs), p_bs = paired_bootstrap_diff(_fast_auc, y, a, b, n_boot=1000)
    assert d_bs == pytest.approx(d_dl)
    assert (hi_bs - lo_bs) == pytest.approx(hi_dl - lo_dl, rel=0.25)
    assert abs(math.log10(max(p_bs, 1e-3)) - math.log10(max(p_dl, 1e-3))) < 0.7


# --- Bootstrap ---------------------------------------------------------------


def test_bootstrap_ci_contains_estimate_and_narrows():
    rng = np.random.default_rng(0)
    widths = []
    for n in (60, 2000):
        y = rng.integers(0, 2, n)
        s = y + rng.normal(scale=1.5, size=n)
        lo, hi = bootstrap_ci(_fast_auc, y, s, n_boot=300)
        assert lo <= roc_auc_score(y, s) <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3


def test_bootstrap_ci_2d_scores_and_determinism():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    probs = rng.dirichlet(np.ones(3), 200)
    probs[np.arange(200), y] += 0.5
    def acc(t, p):
        return accuracy_score(t, p.argmax(axis=1))
    ci1 = bootstrap_ci(acc, y, probs, n_boot=300, seed=7)
    ci2 = bootstrap_ci(acc, y, probs, n_boot=300, seed=7)
    assert ci1 == ci2
    assert ci1[0] <= acc(y, probs) <= ci1[1]
    assert 0.0 <= ci1[0] < ci1[1] <= 1.0


def test_fast_auc_matches_sklearn():
    y, a, _ = _binary_case(n=100)
    assert _fast_auc(y, a) == pytest.approx(roc_auc_score(y, a))


def test_bootstrap_ci_skips_undefined_resamples():
    y = np.array([0, 1, 0, 1])
    s = np.array([0.1, 0.9, 0.2, 0.8])
    lo, hi = bootstrap_ci(roc_auc_score, y, s, n_boot=200)
    assert (lo, hi) == (1.0, 1.0)  # every valid resample is perfectly separated
    assert bootstrap_ci(_fast_auc, y, s, n_boot=200) == (1.0, 1.0)  # metric raising ValueError
    for metric in (roc_auc_score, _fast_auc):
        nan_ci = bootstrap_ci(metric, np.zeros(5, int), np.arange(5.0), n_boot=50)
        assert all(math.isnan(v) for v in nan_ci)


def test_paired_bootstrap_identical_and_clearly_different():
    y, a, b = _binary_case(n=200, seed=5)
    assert paired_bootstrap_diff(_fast_auc, y, a, a.copy(), n_boot=200) == (0.0, (0.0, 0.0), 1.0)
    noise = np.random.default_rng(9).normal(size=len(y))
    diff, (lo, hi), p = paired_bootstrap_diff(_fast_auc, y, a, noise, n_boot=300)
    assert diff == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, noise))
    assert 0.0 < lo <= diff <= hi
    assert p < 0.01


# --- Calibration -------------------------------------------------------------


def test_ece_zero_for_correct_one_hot():
    y = np.array([0, 2, 1, 1, 0])
    probs = np.eye(3)[y]
    assert expected_calibration_error(y, probs) == 0.0


def test_ece_single_bin_equals_gap():
    y = np.array([0, 0, 1, 1])  # argmax is always class 0 -> accuracy 0.5
    probs = np.tile([0.7, 0.3], (4, 1))
    assert expected_calibration_error(y, probs, n_bins=10) == pytest.approx(0.2)


def test_ece_matches_reliability_bins():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 500)
    probs = rng.dirichlet(np.ones(4) * 0.5, 500)
    rb = reliability_bins(y, probs, n_bins=15)
    count = np.array(rb["bin_count"])
    gap = np.abs(np.array(rb["bin_accuracy"]) - np.array(rb["bin_confidence"]))
    assert count.sum() == 500
    assert expected_calibration_error(y, probs, 15) == pytest.approx((count * gap).sum() / 500)


def test_reliability_bins_empty_bins_are_nan_free():
    y = np.array([0, 0, 1, 1])
    probs = np.tile([0.7, 0.3], (4, 1))
    rb = reliability_bins(y, probs, n_bins=10)
    assert rb["bin_count"] == [0] * 6 + [4] + [0] * 3  # 0.7 falls in (0.6, 0.7]
    assert rb["bin_confidence"][6] == pytest.approx(0.7)
    assert rb["bin_accuracy"][6] == pytest.approx(0.5)
    assert rb["bin_confidence"][0] == pytest.approx(0.05)
    assert rb["bin_accuracy"][0] == 0.0
    assert not any(math.isnan(v) for v in rb["bin_confidence"] + rb["bin_accuracy"])


# --- mean_std ----------------------------------------------------------------


def test_mean_std():
    out = mean_std([1, 2, 3])
    assert out == {"mean": 2.0, "std": 1.0, "values": [1.0, 2.0, 3.0]}
    assert all(isinstance(v, float) for v in out["values"])
    assert mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "values": [0.5]}


@pytest.mark.parametrize("k,n", [(2, 4), (2, 300), (4, 12), (6, 500)])
def test_weighted_bootstrap_equals_one_resample_at_a_time(k, n):
    """The metrics' all-resamples-at-once form gives what calling the metric on each resample gives,
    nan (a class missing from a resample) included."""
    from medclf import metrics
    from medclf.stats import _boot_indices, _boot_values

    rng = np.random.default_rng(k * n)
    y = rng.integers(0, k, n)
    probs = rng.dirichlet(np.ones(k), n).round(2)  # rounded: tied scores
    funcs = dict(metrics.metric_functions([f"c{i}" for i in range(k)]))
    funcs.update({f"specificity_{i}": metrics.specificity_of(i) for i in range(k)})
    idx = _boot_indices(n, 200, seed=1)
    for name, metric in funcs.items():
        assert hasattr(metric, "on_weights"), name
        fast = _boot_values(metric, y, probs, idx)
        slow = _boot_values(lambda a, b, m=metric: m(a, b), y, probs, idx)  # no on_weights: one by one
        np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=name)
        if n <= 12 and name.startswith("recall"):
            assert np.isnan(slow).any(), name  # the undefined case is exercised


def test_a_test_sets_accuracy_falls_in_its_sampled_range_not_in_the_estimates_ci():
    """An unbiased estimate from 624 images (out-of-fold size of a 624-image set) and test sets of 150 images from
    the same source: the Wilson CI of the expected accuracy holds far fewer than 95% of the test sets' accuracies
    (it is not meant to); the sampled range for 150 images holds about 95%."""
    from medclf.stats import proportion_ci

    rng = np.random.default_rng(0)
    true, n, m, trials = 0.9, 624, 150, 400
    in_ci = in_range = 0
    for t in range(trials):
        correct = int(rng.binomial(n, true))
        ci = proportion_ci(correct, n)
        low, high = sampled_test_accuracy_range(correct / n, ci, m, draws=4000, seed=t)
        test = rng.binomial(m, true) / m
        in_ci += ci[0] <= test <= ci[1]
        in_range += low <= test <= high
    assert in_ci / trials < 0.75
    assert 0.92 <= in_range / trials <= 0.99


def test_the_sampled_range_narrows_to_the_ci_for_a_huge_test_set_and_stays_in_0_1():
    low, high = sampled_test_accuracy_range(0.9, (0.88, 0.92), 10**7)
    assert low == pytest.approx(0.88, abs=0.002) and high == pytest.approx(0.92, abs=0.002)
    low, high = sampled_test_accuracy_range(1.0, (0.995, 1.0), 100)
    assert 0.97 <= low <= 1.0 and high == 1.0
    assert sampled_test_accuracy_range(0.8, None, 100) == sampled_test_accuracy_range(0.8, (0.8, 0.8), 100)
