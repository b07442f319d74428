"""The robustness regression gate as a table: floors, significance against the champion (paired
when both have per-image outcomes), the legacy margin, missing numbers, the strongest attack."""

from __future__ import annotations

import pytest

from transferlab.config import GateParams
from transferlab.gate import (
    GateMetrics,
    decide,
    eps_key,
    from_tags,
    gate_metrics,
    metrics_from_summary,
    pack_outcomes,
    to_tags,
    unpack_outcomes,
)

GATE = GateParams(eps="4/255", min_clean_acc=0.7, min_robust_acc=0.3, max_drop=0.05)
M = GateMetrics

CASES = [
    # champions without image counts (judged before intervals): the max_drop margin decides
    # id, candidate, champion, promote, first reason starts with
    ("first-passing", M(0.9, 0.5), None, True, "clean_acc 0.9000 >= floor"),
    ("clean-below-floor", M(0.6, 0.5), None, False, "clean_acc 0.6000 < floor 0.7000"),
    ("robust-below-floor", M(0.9, 0.2), None, False, "robust_acc 0.2000 < floor 0.3000"),
    ("exactly-at-floors", M(0.7, 0.3), None, True, "clean_acc 0.7000 >= floor"),
    ("better-than-champion", M(0.95, 0.6), M(0.9, 0.5), True, "clean_acc 0.9500 >= floor"),
    ("within-margin", M(0.86, 0.46), M(0.9, 0.5), True, "clean_acc 0.8600 >= floor"),
    ("clean-regresses", M(0.84, 0.5), M(0.9, 0.5), False, "clean_acc 0.8400 vs champion 0.9000"),
    ("robust-regresses", M(0.9, 0.4), M(0.9, 0.5), False, "robust_acc 0.4000 vs champion 0.5000"),
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


def outcomes(n: int, right: int) -> tuple[int, ...]:
    return tuple(int(i < right) for i in range(n))


def measured(clean: tuple[int, ...], robust: tuple[int, ...], images: str = "abc") -> GateMetrics:
    n = len(clean)
    return M(sum(clean) / n, sum(robust) / n, n, clean, robust, images, "strongest (fgsm, pgd)")


def test_a_tie_with_the_champion_keeps_it():
    same = measured(outcomes(64, 50), outcomes(64, 25))
    decision = decide(same, same, GATE)
    assert not decision.promote
    assert decision.reasons[0].startswith("not significantly better")
    assert any("tie (paired McNemar" in r for r in decision.reasons)
    # 2 images better of 64 is noise too
    slightly = measured(outcomes(64, 52), outcomes(64, 25))
    assert not decide(slightly, same, GATE).promote


def test_a_significantly_better_candidate_is_promoted_and_a_worse_one_is_not():
    champion = measured(outcomes(64, 60), outcomes(64, 20))
    better = measured(outcomes(64, 60), outcomes(64, 40))
    decision = decide(better, champion, GATE)
    assert decision.promote
    assert any(
        "robust_acc 0.6250 vs champion 0.3125: significantly better" in r for r in decision.reasons
    )
    worse = decide(champion, better, GATE)
    assert not worse.promote and "significantly worse" in worse.reasons[0]
    # better on robust but significantly worse on clean: blocked
    trade = measured(outcomes(64, 46), outcomes(64, 40))
    blocked = decide(trade, champion, GATE)
    assert not blocked.promote and blocked.reasons[0].startswith("clean_acc 0.7188 vs champion")


def test_other_images_fall_back_to_interval_overlap():
    champion = measured(outcomes(64, 50), outcomes(64, 20), images="old")
    better = measured(outcomes(64, 50), outcomes(64, 45), images="new")
    decision = decide(better, champion, GATE)
    assert decision.promote
    assert any("intervals [" in r and "significantly better" in r for r in decision.reasons)


def test_outcomes_survive_the_registry_tags():
    m = measured(outcomes(13, 7), outcomes(13, 2))
    assert unpack_outcomes(pack_outcomes(m.clean_outcomes)) == m.clean_outcomes
    assert from_tags(to_tags(m)) == m
    assert unpack_outcomes("") is None and unpack_outcomes("5:zz") is None
    legacy = from_tags({"gate.clean_acc": "0.9", "gate.robust_acc": "None"})
    assert legacy == M(0.9, None)


def test_the_strongest_attack_is_the_per_image_worst_case():
    attack_json = {
        "summary": {
            "svm": {
                "clean_acc": 0.75,
                "fgsm": {"eps_4/255": 0.5},
                "pgd": {"eps_4/255": 0.25},
            }
        },
        "outcomes": {
            "svm": {
                "clean": [1, 1, 1, 0],
                "fgsm": {"eps_4/255": [1, 1, 0, 0]},
                "pgd": {"eps_4/255": [0, 1, 1, 0]},
            }
        },
        "images": "abc",
    }
    m = gate_metrics(attack_json, "svm", "strongest", 4 / 255)
    # image 0 falls to pgd, image 2 to fgsm: only image 1 survives both
    assert m.robust_outcomes == (0, 1, 0, 0) and m.robust_acc == 0.25 and m.n == 4
    assert m.robust_acc <= min(0.5, 0.25) and "pgd" in m.attack and "fgsm" in m.attack
    assert gate_metrics(attack_json, "svm", "fgsm", 4 / 255).robust_acc == 0.5
    assert gate_metrics(attack_json, "svm", "pgd", 2 / 255).robust_acc is None
    legacy = {"summary": attack_json["summary"]}  # no per-image outcomes: the weakest rate
    assert gate_metrics(legacy, "svm", "strongest", 4 / 255).robust_acc == 0.25


def test_metrics_come_from_the_attack_summary_at_the_gate_eps():
    summary = {"svm": {"clean_acc": 0.8, "fgsm": {"eps_0/255": 0.8, "eps_4/255": 0.4}}}
    assert eps_key(4 / 255) == "eps_4/255"
    assert metrics_from_summary(summary, "svm", "fgsm", 4 / 255) == M(0.8, 0.4, attack="fgsm")
    assert metrics_from_summary(summary, "svm", "fgsm", 2 / 255) == M(0.8, None, attack="fgsm")
    assert metrics_from_summary(summary, "top", "fgsm", 4 / 255) == M(None, None, attack="fgsm")


def test_gate_params_validate():
    assert GateParams(eps="8/255").eps == pytest.approx(8 / 255)
    with pytest.raises(ValueError):
        GateParams(min_clean_acc=1.5)
    with pytest.raises(ValueError):
        GateParams(unknown=1)
    with pytest.raises(ValueError, match="strongest"):
        GateParams(attack="pgdd")
    assert GateParams().attack == "strongest" and GateParams().alpha == 0.05


def test_a_champion_judged_under_another_attack_is_not_held_against_the_candidate():
    fgsm_champion = M(0.9, 0.6, attack="fgsm")  # judged before the strongest evaluation
    candidate = M(0.9, 0.1, attack="strongest (fgsm, pgd)")
    decision = decide(candidate, fgsm_champion, GATE_LOW_FLOOR)
    assert decision.promote, decision.reasons
    assert any("not comparable" in r for r in decision.reasons)


GATE_LOW_FLOOR = GateParams(eps="4/255", min_clean_acc=0.7, min_robust_acc=0.0, max_drop=0.05)
