"""Uncertainty of accuracies and paired comparisons of classifiers on the same test images.

Every accuracy the pipeline reports is a proportion over a few dozen to a few thousand test
images, so it carries a binomial uncertainty: one image of 45 is 2.2 points. This module turns
per-image outcomes into

- a Wilson score interval for one accuracy (good at small n and near 0 or 1, where the normal
  approximation gives intervals outside [0, 1]);
- a paired comparison of two classifiers scored on the same images: McNemar's exact test with
  the mid-p correction (it looks only at the images where the two disagree, so it is far more
  sensitive than comparing two intervals);
- a learning-curve point: a mean over seeds whose interval combines the seed-to-seed spread
  (ddof=1) and the sampling of the shared test set.

Plain numpy + scipy, no torch: the report and the gate use it without loading a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom, norm

CONFIDENCE = 0.95
WIN, LOSS, TIE = "win", "loss", "tie"


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(norm.ppf(0.5 + confidence / 2))


def wilson(successes: int, n: int, *, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n``.

    Returns:
        (low, high) within [0, 1]; (0.0, 1.0) when ``n`` is 0 (nothing is known).
    """
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at p = 0 or 1 the bound is exactly 0 or 1 (rounding would leave it a hair inside)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def _as_bool(correct: Sequence[bool] | np.ndarray) -> np.ndarray:
    arr = np.asarray(correct)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D vector of per-image outcomes, got shape {arr.shape}")
    return arr.astype(bool)


def accuracy_interval(
    correct: Sequence[bool] | np.ndarray, *, confidence: float = CONFIDENCE
) -> tuple[float | None, float, float]:
    """(accuracy, ci_low, ci_high) from per-image outcomes (True = right); None when empty."""
    c = _as_bool(correct)
    low, high = wilson(int(c.sum()), len(c), confidence=confidence)
    return (float(c.mean()) if len(c) else None), low, high


def with_interval(
    key: str, correct: Sequence[bool] | np.ndarray, *, confidence: float = CONFIDENCE
) -> dict[str, float | None]:
    """``{key: acc, key_ci_low: low, key_ci_high: high}``: the metric-file and MLflow spelling."""
    acc, low, high = accuracy_interval(correct, confidence=confidence)
    if acc is None:
        return {key: None, f"{key}_ci_low": None, f"{key}_ci_high": None}
    return {key: acc, f"{key}_ci_low": low, f"{key}_ci_high": high}


def interval_of(acc: float, n: int, *, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson interval of an accuracy known only as a rate over ``n`` images."""
    return wilson(round(acc * n), n, confidence=confidence)


@dataclass(frozen=True)
class PairedTest:
    """McNemar's test of classifier A against B on the same images.

    Attributes:
        only_a: images A gets right and B wrong. only_b: the reverse.
        n: images compared.
        diff: accuracy of A minus accuracy of B.
        p_value: two-sided mid-p value (1.0 when they never disagree).
        verdict: "win" (A significantly better), "loss" (B better) or "tie".
    """

    only_a: int
    only_b: int
    n: int
    diff: float
    p_value: float
    verdict: str


def mcnemar_midp(only_a: int, only_b: int) -> float:
    """Two-sided mid-p value of McNemar's exact test from the two discordant counts.

    Under "no difference" each discordant image is a fair coin, so the smaller count follows
    Binomial(only_a + only_b, 1/2). The mid-p version counts half the probability of the
    observed value: it keeps the nominal level closely and is less conservative than the exact
    test (Fagerland, Lydersen and Laake, 2013).
    """
    m = only_a + only_b
    if m == 0:
        return 1.0
    k = min(only_a, only_b)
    p = 2 * (binom.cdf(k, m, 0.5) - 0.5 * binom.pmf(k, m, 0.5))
    return float(min(1.0, p))


def mcnemar(
    correct_a: Sequence[bool] | np.ndarray,
    correct_b: Sequence[bool] | np.ndarray,
    *,
    alpha: float = 1 - CONFIDENCE,
) -> PairedTest:
    """Compare two classifiers by their per-image outcomes on the same images, in the same order.

    Args:
        correct_a, correct_b: (N,) booleans, True where the classifier is right.
        alpha: significance level; a difference with ``p_value >= alpha`` is a "tie".
    """
    a, b = _as_bool(correct_a), _as_bool(correct_b)
    if a.shape != b.shape:
        raise ValueError(
            f"paired test needs outcomes on the same images: got {len(a)} and {len(b)}"
        )
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = mcnemar_midp(only_a, only_b)
    verdict = TIE if p >= alpha else (WIN if only_a > only_b else LOSS)
    diff = float(a.mean() - b.mean()) if len(a) else 0.0
    return PairedTest(only_a, only_b, len(a), diff, p, verdict)


def compare_predictions(
    pred_a: Sequence[int] | np.ndarray,
    pred_b: Sequence[int] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    *,
    alpha: float = 1 - CONFIDENCE,
) -> PairedTest:
    """:func:`mcnemar` from two prediction vectors and the true labels of the same images."""
    y = np.asarray(labels)
    pa, pb = np.asarray(pred_a), np.asarray(pred_b)
    if not (pa.shape == pb.shape == y.shape):
        raise ValueError(
            f"paired test needs predictions on the same images: {pa.shape}, {pb.shape} vs "
            f"labels {y.shape}"
        )
    return mcnemar(pa == y, pb == y, alpha=alpha)


def overlap_verdict(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Unpaired fallback: "win" if interval ``a`` lies wholly above ``b``, "loss" if below,
    else "tie". Conservative: overlapping 95% intervals can still differ at the 5% level."""
    if a[0] > b[1]:
        return WIN
    if a[1] < b[0]:
        return LOSS
    return TIE


def seed_mean_interval(
    accs: Sequence[float], n_test: int, *, confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """Mean accuracy over seeds on one shared test set of ``n_test`` images, and its interval.

    The variance of the mean adds the seed-to-seed spread (sample variance, ddof=1, over the
    seeds) and the binomial variance of the shared test set, which the seeds do not resample
    and so cannot show: ``s^2 / S + p (1 - p) / n_test``. With one seed only the binomial part
    is known.

    Returns:
        (mean, low, high), the bounds clipped to [0, 1].
    """
    x = np.asarray(accs, dtype=float)
    if len(x) == 0:
        raise ValueError("need at least one seed")
    if n_test < 1:
        raise ValueError(f"n_test must be >= 1, got {n_test}")
    mean = float(x.mean())
    var = mean * (1 - mean) / n_test
    if len(x) > 1:
        var += float(x.var(ddof=1)) / len(x)
    half = _z(confidence) * math.sqrt(var)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def paired_seed_difference(
    correct_a: Sequence[np.ndarray],
    correct_b: Sequence[np.ndarray],
    *,
    confidence: float = CONFIDENCE,
) -> tuple[float, float, float]:
    """Mean accuracy difference A - B over seeds, each seed scoring both on the same test images.

    The variance adds the seed spread of the per-seed differences (ddof=1) and the paired
    sampling variance of the shared test set, ``(d01 + d10 - (d01 - d10)^2) / n`` averaged over
    seeds (d01, d10: the discordant fractions). The seeds do not resample the test set, so that
    part does not shrink with more seeds.

    Returns:
        (mean difference, low, high).
    """
    if len(correct_a) != len(correct_b) or not correct_a:
        raise ValueError("need the same, non-zero number of seeds for both methods")
    diffs, paired_vars = [], []
    for a, b in zip(correct_a, correct_b, strict=True):
        a, b = _as_bool(a), _as_bool(b)
        if a.shape != b.shape or len(a) == 0:
            raise ValueError("each seed needs both methods' outcomes on the same images")
        d10, d01 = float((a & ~b).mean()), float((~a & b).mean())
        diffs.append(d10 - d01)
        paired_vars.append((d10 + d01 - (d10 - d01) ** 2) / len(a))
    d = np.asarray(diffs)
    var = float(np.mean(paired_vars))
    if len(d) > 1:
        var += float(d.var(ddof=1)) / len(d)
    half = _z(confidence) * math.sqrt(var)
    mean = float(d.mean())
    return mean, mean - half, mean + half
