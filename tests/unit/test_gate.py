"""The robustness regression gate as a table: floors, regression margin, missing numbers."""

from __future__ import annotations

import pytest

from transferlab.config import GateParams
from transferlab.gate import GateMetrics, decide, eps_key, metrics_from_summary

GATE = GateParams(eps="4/255", min_clean_acc=0.7, min_robust_acc=0.3, max_drop=0.05)
M = GateMetrics

CASES = [
    # id, candidate, champion, promote, first reason starts with
    ("first-passing", M(0.9, 0.5), None, True, "clean_acc 0.9000 >= floor"),
    ("clean-below-floor", M(0.6, 0.5), None, False, "clean_acc 0.6000 < floor 0.7000"),
    ("robust-below-floor", M(0.9, 0.2), None, False, "robust_acc 0.2000 < floor 0.3000"),
    ("exactly-at-floors", M(0.7, 0.3), None, True, "clean_acc 0.7000 >= floor"),
    ("better-than-champion", M(0.95, 0.6), M(0.9, 0.5), True, "clean_acc 0.9500 >= floor"),
    ("within-margin", M(0.86, 0.46), M(0.9, 0.5), True, "clean_acc 0.8600 >= floor"),
    ("clean-regresses", M(0.84, 0.5), M(0.9, 0.5), False, "clean_acc 0.8400 falls more than"),
    ("robust-regresses", M(0.9, 0.4), M(0.9, 0.5), False, "robust_acc 0.4000 falls more than"),
    ("robust-not-measured", M(0.9, None), None, False, "robust_acc was not measured"),
    ("champion-without-numbers", M(0.9, 0.5), M(None, None), True, "clean_acc 0.9000 >= floor"),
]


@pytest.mark.parametrize(
    ("candidate", "champion", "promote", "first"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_gate_table(candidate, champion, promote, first):
    decision = decide(candidate, champion, GATE)
    assert decision.promote is promote
    assert decision.decision == ("promote" if promote else "keep")
    assert decision.reasons[0].startswith(first), decision.reasons
    # every check leaves a reason: two floors, plus the champion comparison(s)
    assert len(decision.reasons) >= 3


def test_every_failure_is_listed_before_the_passes():
    decision = decide(M(0.1, 0.1), M(0.9, 0.9), GATE)
    assert not decision.promote
    assert len(decision.reasons) == 4
    assert all("floor" in r or "falls more than" in r for r in decision.reasons)


def test_metrics_come_from_the_attack_summary_at_the_gate_eps():
    summary = {"svm": {"clean_acc": 0.8, "fgsm": {"eps_0/255": 0.8, "eps_4/255": 0.4}}}
    assert eps_key(4 / 255) == "eps_4/255"
    assert metrics_from_summary(summary, "svm", "fgsm", 4 / 255) == M(0.8, 0.4)
    assert metrics_from_summary(summary, "svm", "fgsm", 2 / 255) == M(0.8, None)
    assert metrics_from_summary(summary, "top", "fgsm", 4 / 255) == M(None, None)


def test_gate_params_validate():
    assert GateParams(eps="8/255").eps == pytest.approx(8 / 255)
    with pytest.raises(ValueError):
        GateParams(min_clean_acc=1.5)
    with pytest.raises(ValueError):
        GateParams(unknown=1)
