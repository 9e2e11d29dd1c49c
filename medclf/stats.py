"""Statistics for model evaluation: bootstrap CIs, paired tests, calibration."""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
from scipy import stats

Metric = Callable[[np.ndarray, np.ndarray], float]


def _safe_metric(metric: Metric, y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Evaluate `metric`, returning nan where it is undefined (ValueError or non-finite)."""
    try:
        value = float(metric(y_true, y_score))
    except ValueError:
        return float("nan")
    return value if np.isfinite(value) else float("nan")


def _boot_values(
    metric: Metric, y_true: np.ndarray, y_score: np.ndarray, idx: np.ndarray
) -> np.ndarray:
    """Metric on each resample (rows of `idx`); nan where undefined, without sklearn's warnings.

    A metric with an `on_weights(y, score, weights)` form (medclf.metrics) gets every resample at once as
    per-image multiplicities, a chunk of resamples at a time; others are called once per resample."""
    on_weights = getattr(metric, "on_weights", None)
    if on_weights is not None:
        return _weighted_boot_values(on_weights, y_true, y_score, idx)
    with warnings.catch_warnings():
        from sklearn.exceptions import UndefinedMetricWarning  # imported where used: slow to import

        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return np.array([_safe_metric(metric, y_true[i], y_score[i]) for i in idx])


WEIGHT_CHUNK = 4_000_000  # resamples × images per weighted chunk: bounds memory (8 bytes each, a few copies)


def _weighted_boot_values(on_weights, y_true: np.ndarray, y_score: np.ndarray, idx: np.ndarray) -> np.ndarray:
    n_boot, n = idx.shape
    rows = max(1, WEIGHT_CHUNK // max(n, 1))
    values = []
    for start in range(0, n_boot, rows):
        chunk = idx[start:start + rows]
        offsets = np.arange(len(chunk))[:, None] * n
        weights = np.bincount((chunk + offsets).ravel(), minlength=len(chunk) * n).reshape(len(chunk), n)
        # column-major: the metrics' sparse products read weights by image, which is then contiguous
        weights = np.asfortranarray(weights, dtype=float)
        values.append(np.asarray(on_weights(y_true, y_score, weights), dtype=float))
    boot = np.concatenate(values)
    return np.where(np.isfinite(boot), boot, np.nan)


def _boot_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """Return an (n_boot, n) array of row indices drawn with replacement."""
    if n == 0:
        raise ValueError("cannot bootstrap an empty sample")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _percentile_ci(values: np.ndarray, alpha: float) -> tuple[float, float]:
    """Percentile interval of the finite entries of `values`; (nan, nan) if none."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def bootstrap_ci(
    metric: Metric,
    y_true: np.ndarray,
    y_score: np.ndarray,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of `metric(y_true, y_score)`, resampling rows.

    Resamples where the metric is undefined are skipped; returns (nan, nan) if none are valid.
    """
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    idx = _boot_indices(len(y_true), n_boot, seed)
    boot = _boot_values(metric, y_true, y_score, idx)
    return _percentile_ci(boot, alpha)


def proportion_ci(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a proportion (scipy's binomtest); (nan, nan) for n = 0. Unlike the percentile
    bootstrap it stays honest at 0 or n successes: no errors on n images still allows an error rate of about
    3.8/n, where every bootstrap resample is perfect and the interval would have zero width."""
    if n == 0:
        return float("nan"), float("nan")
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=1 - alpha, method="wilson")
    return float(ci.low), float(ci.high)


def sampled_test_accuracy_range(value: float, ci: tuple[float, float] | None, m: int, alpha: float = 0.05,
                   draws: int = 20_000, seed: int = 0) -> tuple[float, float]:
    """The central 1 - alpha range of the accuracy that a test set of m new images would show, for an expected
    accuracy `value` with confidence interval `ci`. The CI is for the expected value; a finite test set adds its
    own binomial sampling error on top (the larger part for a few hundred images), so its accuracy can fall
    outside the CI of an estimate that is not optimistic. The expected value is drawn from a normal of the CI's
    half-width / 1.96 (clipped to [0, 1]), then each test set's correct count from a binomial."""
    assert m >= 1 and 0.0 <= value <= 1.0
    rng = np.random.default_rng(seed)
    se = 0.0 if ci is None else max(0.0, ci[1] - ci[0]) / (2 * 1.959964)
    expected = np.clip(rng.normal(value, se, draws), 0.0, 1.0)
    scores = rng.binomial(m, expected) / m
    low, high = np.quantile(scores, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def paired_bootstrap_diff(
    metric: Metric,
    y_true: np.ndarray,
    score_a: np.ndarray,
    score_b: np.ndarray,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, tuple[float, float], float]:
    """Return (metric(a) - metric(b), percentile CI, two-sided p) from paired resampling.

    The p-value is 2 * min(P(diff <= 0), P(diff >= 0)) over valid resamples, capped at 1.
    """
    y_true, score_a, score_b = map(np.asarray, (y_true, score_a, score_b))
    if len(score_a) != len(y_true) or len(score_b) != len(y_true):
        raise ValueError("y_true, score_a and score_b must have the same number of rows")
    diff = _safe_metric(metric, y_true, score_a) - _safe_metric(metric, y_true, score_b)
    idx = _boot_indices(len(y_true), n_boot, seed)
    boot = _boot_values(metric, y_true, score_a, idx) - _boot_values(metric, y_true, score_b, idx)
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return diff, (float("nan"), float("nan")), float("nan")
    p = min(1.0, 2 * min(np.mean(boot <= 0), np.mean(boot >= 0)))
    return diff, _percentile_ci(boot, alpha), float(p)


def mcnemar_test(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Two-sided McNemar p-value for paired per-sample correctness of two classifiers.

    Exact binomial when the discordant count b + c < 25, else chi-square with continuity correction.
    """
    a = np.asarray(correct_a, dtype=bool)
    b_arr = np.asarray(correct_b, dtype=bool)
    if a.shape != b_arr.shape:
        raise ValueError("correct_a and correct_b must have the same shape")
    b = int(np.sum(a & ~b_arr))
    c = int(np.sum(~a & b_arr))
    n = b + c
    if n == 0:
        return 1.0
    if n < 25:
        return float(stats.binomtest(b, n, 0.5).pvalue)
    statistic = (abs(b - c) - 1) ** 2 / n
    return float(stats.chi2.sf(statistic, df=1))


def _delong_components(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and their DeLong covariance for a (k, N) score array (Sun & Xu 2014 midrank form)."""
    pos = scores[:, y_true == 1]
    neg = scores[:, y_true == 0]
    m, n = pos.shape[1], neg.shape[1]
    # Midranks within positives, within negatives, and over the pooled sample.
    tx = stats.rankdata(pos, axis=1)
    ty = stats.rankdata(neg, axis=1)
    tz = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n  # structural components of the positives
    v01 = 1.0 - (tz[:, m:] - ty) / m  # structural components of the negatives
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def delong_auc_test(
    y_true: np.ndarray, score_a: np.ndarray, score_b: np.ndarray
) -> tuple[float, float, tuple[float, float]]:
    """DeLong test for two correlated AUCs on the same binary labels.

    Returns (auc_a - auc_b, two-sided p-value, 95% CI of the difference). With zero variance
    (e.g. identical scores) the CI collapses to the difference and p is 1.0 if it is 0, else 0.0.
    """
    y_true = np.asarray(y_true).ravel()
    scores = np.vstack([np.asarray(score_a, float).ravel(), np.asarray(score_b, float).ravel()])
    if scores.shape[1] != y_true.size:
        raise ValueError("score_a, score_b and y_true must have the same length")
    if not np.isin(y_true, (0, 1)).all() or np.unique(y_true).size != 2:
        raise ValueError("delong_auc_test needs binary 0/1 labels with both classes present")
    aucs, cov = _delong_components(y_true, scores)
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if var <= 1e-15:
        p = 1.0 if abs(diff) < 1e-12 else 0.0
        return diff, p, (diff, diff)
    se = np.sqrt(var)
    p = float(2 * stats.norm.sf(abs(diff) / se))
    half = float(stats.norm.ppf(0.975) * se)
    return diff, p, (diff - half, diff + half)


def _top_label(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (confidence, correct) for the arg-max class; 1-D probs are P(class 1)."""
    probs = np.asarray(probs, dtype=float)
    if probs.ndim == 1:
        probs = np.column_stack([1.0 - probs, probs])
    y_true = np.asarray(y_true).ravel()
    if probs.shape[0] != y_true.size:
        raise ValueError("y_true and probs must have the same number of rows")
    return probs.max(axis=1), probs.argmax(axis=1) == y_true


def _bin_sums(
    y_true: np.ndarray, probs: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin (count, confidence sum, correct sum) over equal-width bins (lo, hi] of [0, 1]."""
    conf, correct = _top_label(y_true, probs)
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    conf_sum = np.bincount(bins, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=correct.astype(float), minlength=n_bins)
    return count, conf_sum, acc_sum


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: bin-count-weighted mean |accuracy - confidence| over equal-width bins."""
    count, conf_sum, acc_sum = _bin_sums(y_true, probs, n_bins)
    total = count.sum()
    if total == 0:
        return float("nan")
    # sum_b (n_b / N) * |acc_b - conf_b| == sum_b |acc_sum_b - conf_sum_b| / N
    return float(np.abs(acc_sum - conf_sum).sum() / total)


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> dict:
    """Per-bin mean confidence, accuracy and count for a reliability diagram.

    Empty bins have count 0, confidence equal to the bin centre and accuracy 0.0 (no nans).
    """
    count, conf_sum, acc_sum = _bin_sums(y_true, probs, n_bins)
    centres = (np.arange(n_bins) + 0.5) / n_bins
    safe = np.maximum(count, 1)
    confidence = np.where(count > 0, conf_sum / safe, centres)
    accuracy = np.where(count > 0, acc_sum / safe, 0.0)
    return {
        "bin_confidence": confidence.tolist(),
        "bin_accuracy": accuracy.tolist(),
        "bin_count": count.astype(int).tolist(),
    }


def mean_std(values: Sequence[float]) -> dict:
    """Return {"mean", "std" (ddof=1; 0.0 for one value), "values"} for e.g. per-seed results."""
    arr = np.asarray(values, dtype=float).ravel()
    if arr.size == 0:
        raise ValueError("mean_std needs at least one value")
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "values": [float(v) for v in arr]}
