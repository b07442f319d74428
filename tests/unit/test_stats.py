"""Intervals and paired tests against known values."""

from __future__ import annotations

import numpy as np
import pytest

from transferlab.stats import (
    LOSS,
    TIE,
    WIN,
    accuracy_interval,
    compare_predictions,
    interval_of,
    mcnemar,
    mcnemar_midp,
    overlap_verdict,
    paired_seed_difference,
    seed_mean_interval,
    wilson,
    with_interval,
)


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        # Newcombe (1998), Statistics in Medicine 17:857, table I, method 3 (Wilson score)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
        # closed forms: 0/n -> (0, z^2 / (n + z^2)); n/n -> (n / (n + z^2), 1)
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
    ],
)
def test_wilson_matches_known_values(k, n, low, high):
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(low, abs=1e-4)
    assert hi == pytest.approx(high, abs=1e-4)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_edge_cases():
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes <= n"):
        wilson(5, 3)
    # wider at 99% than at 95%
    assert wilson(30, 45, confidence=0.99)[0] < wilson(30, 45)[0]
    assert interval_of(33 / 45, 45) == pytest.approx(wilson(33, 45))


def test_interval_keys_are_the_metric_spelling():
    m = with_interval("test_acc", [True, True, False, True])
    assert m["test_acc"] == 0.75
    assert m["test_acc_ci_low"] < 0.75 < m["test_acc_ci_high"]
    assert with_interval("val_acc", []) == {
        "val_acc": None,
        "val_acc_ci_low": None,
        "val_acc_ci_high": None,
    }
    assert accuracy_interval(np.ones(20, bool))[0] == 1.0


def test_identical_predictions_are_a_tie():
    y = np.arange(50) % 5
    pred = y.copy()
    pred[::3] = (pred[::3] + 1) % 5
    t = compare_predictions(pred, pred.copy(), y)
    assert t.verdict == TIE
    assert t.p_value == 1.0 and t.only_a == t.only_b == 0 and t.diff == 0.0


def test_a_clearly_better_classifier_wins_and_the_worse_loses():
    y = np.zeros(100, int)
    good = np.zeros(100, int)  # all right
    bad = good.copy()
    bad[:30] = 1  # wrong on 30 images
    assert compare_predictions(good, bad, y).verdict == WIN
    t = compare_predictions(bad, good, y)
    assert t.verdict == LOSS and t.only_b == 30 and t.diff == pytest.approx(-0.3)
    assert t.p_value < 1e-6


def test_a_small_difference_is_a_tie():
    a = np.ones(45, bool)
    b = a.copy()
    b[:2] = False  # 2 images of 45: 4.4 points, within the noise
    t = mcnemar(a, b)
    assert t.verdict == TIE and t.p_value > 0.05


def test_mid_p_known_values():
    # discordant 10 vs 2: exact two-sided p = 0.0386, mid-p = 0.0386 - P(X=2) = 0.0225
    assert mcnemar_midp(10, 2) == pytest.approx(0.02246, abs=1e-4)
    # 5 vs 0: 2 * (P(X<=0) - P(X=0)/2) = 2 * (1/32 - 1/64) = 1/32
    assert mcnemar_midp(5, 0) == pytest.approx(1 / 32)
    assert mcnemar_midp(3, 3) == 1.0  # equal counts: no evidence either way
    assert mcnemar_midp(0, 0) == 1.0


def test_paired_test_needs_the_same_images():
    with pytest.raises(ValueError, match="same images"):
        mcnemar([True, False], [True])


def test_overlap_verdict():
    assert overlap_verdict((0.8, 0.9), (0.5, 0.7)) == WIN
    assert overlap_verdict((0.5, 0.7), (0.8, 0.9)) == LOSS
    assert overlap_verdict((0.6, 0.85), (0.8, 0.9)) == TIE


def test_seed_mean_interval_adds_seed_spread_to_test_sampling():
    mean, lo, hi = seed_mean_interval([0.8, 0.8, 0.8], 1000)
    # no seed spread: exactly the binomial half-width, not zero
    assert mean == pytest.approx(0.8)
    assert hi - mean == pytest.approx(1.96 * (0.8 * 0.2 / 1000) ** 0.5, rel=1e-3)
    _, lo2, hi2 = seed_mean_interval([0.7, 0.8, 0.9], 1000)
    expected = 1.96 * (0.8 * 0.2 / 1000 + np.var([0.7, 0.8, 0.9], ddof=1) / 3) ** 0.5
    assert hi2 - 0.8 == pytest.approx(expected, rel=1e-3)
    assert lo2 < lo


def test_paired_seed_difference():
    rng = np.random.default_rng(0)
    a = [rng.random(1000) < 0.9 for _ in range(3)]
    b = [x & (rng.random(1000) < 0.8) for x in a]  # b is a minus ~20% of its right answers
    d, lo, hi = paired_seed_difference(a, b)
    assert lo > 0 and d == pytest.approx(
        np.mean([x.mean() - y.mean() for x, y in zip(a, b, strict=True)])
    )
    d0, lo0, hi0 = paired_seed_difference(a, a)
    assert d0 == 0 and lo0 == hi0 == 0
