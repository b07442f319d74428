"""The report's "What to ship": recommendation, intervals, ties, the strongest attack."""

from __future__ import annotations

from transferlab.config import GateParams
from transferlab.html_report import _ship_section
from transferlab.verdict import what_to_ship

N = 60
GATE = GateParams(eps="4/255")


def method(right: int, seconds: float) -> dict:
    """metrics/<method>.json with ``right`` of N test images right (the first ones)."""
    true = [i % 3 for i in range(N)]
    pred = [t if i < right else (t + 1) % 3 for i, t in enumerate(true)]
    return {"test_acc": right / N, "test_pred": pred, "test_true": true, "train_seconds": seconds}


def attack(robust: dict[str, dict[str, int]]) -> dict:
    """metrics/attack.json: per method and attack, the first k images survive at 4/255."""
    outcomes = {
        m: {
            "clean": [1] * N,
            **{a: {"eps_4/255": [int(i < k) for i in range(N)]} for a, k in r.items()},
        }
        for m, r in robust.items()
    }
    summary = {
        m: {"clean_acc": 1.0, **{a: {"eps_4/255": k / N} for a, k in r.items()}}
        for m, r in robust.items()
    }
    return {"summary": summary, "outcomes": outcomes, "images": "x"}


def test_a_tie_on_everything_ships_the_cheapest_and_says_tie():
    metrics = {"svm": method(50, 0.5), "top": method(51, 5.0), "full": method(49, 300.0)}
    adv = attack({m: {"fgsm": 30, "pgd": 20} for m in metrics})
    ship = what_to_ship(metrics, adv, GATE)
    assert ship["recommended"] == "svm"
    assert set(ship["ties"]) == {"top", "full"}
    assert "cheapest" in ship["why"]
    svm = ship["methods"]["svm"]
    lo, hi = svm["clean"]["ci"]
    assert lo < 50 / N < hi and svm["clean"]["n"] == N
    # robust under the strongest: pgd's 20, never fgsm's 30
    assert svm["robust"]["acc"] == 20 / N and "pgd" in ship["attack"]
    assert ship["methods"]["top"]["clean_vs_best"] == "best"
    assert ship["methods"]["svm"]["clean_vs_best"] == "tie"


def test_a_significantly_better_method_is_shipped_and_the_others_are_lower():
    metrics = {"svm": method(30, 0.5), "full": method(58, 300.0)}
    ship = what_to_ship(metrics, attack({m: {"pgd": 10} for m in metrics}), GATE)
    assert ship["recommended"] == "full" and ship["ties"] == []
    assert ship["methods"]["svm"]["clean_vs_best"] == "loss"
    assert "significantly" in ship["why"]


def test_robust_accuracy_breaks_a_clean_tie():
    metrics = {"svm": method(50, 0.5), "top": method(50, 5.0)}
    ship = what_to_ship(metrics, attack({"svm": {"pgd": 5}, "top": {"pgd": 40}}), GATE)
    assert ship["recommended"] == "top"
    assert ship["methods"]["svm"]["robust_vs_best"] == "loss"


def test_without_an_attack_run_the_robust_column_is_empty():
    ship = what_to_ship({"svm": method(50, 0.5)}, None, GATE)
    assert ship["recommended"] == "svm" and ship["methods"]["svm"]["robust"]["acc"] is None


def test_the_html_opens_with_the_verdict_and_the_gate():
    metrics = {"svm": method(50, 0.5), "top": method(51, 5.0)}
    ship = what_to_ship(metrics, attack({m: {"fgsm": 30, "pgd": 20} for m in metrics}), GATE)
    ship["gate"] = {
        "svm": {
            "decision": "keep",
            "reasons": ["not significantly better than the champion"],
            "champion_version": "3",
            "judged_under": ship["attack"],
        }
    }
    page = _ship_section({"ship": ship})
    assert "Ship <code>svm</code>" in page and "<b>tie</b>" in page
    assert "pgd" in page and "[0." in page  # the attack and the intervals are shown
    assert "keep" in page and "not significantly better" in page
    assert "transferlab run" in _ship_section(None)


def test_a_robust_method_that_loses_on_clean_is_named_for_robustness():
    # adv: clean 42/60 (significantly below svm's 58) but 25/60 robust against 0
    metrics = {"svm": method(58, 0.5), "adv": method(42, 60.0)}
    ship = what_to_ship(metrics, attack({"svm": {"pgd": 0}, "adv": {"pgd": 25}}), GATE)
    assert ship["recommended"] == "svm"
    assert ship["methods"]["adv"]["robust_vs_best"] == "best"
    assert ship["methods"]["svm"]["robust_vs_best"] == "loss"
    robust = ship["for_robustness"]
    assert robust["method"] == "adv"
    assert robust["robust_gain"] == 25 / N and abs(robust["clean_cost"] - 16 / N) < 1e-12
    page = _ship_section({"ship": ship})
    assert "Need robustness? Ship <code>adv</code>" in page and "0.267" in page


def test_no_robust_alternative_when_the_pick_is_as_robust():
    metrics = {"svm": method(58, 0.5), "adv": method(42, 60.0)}
    ship = what_to_ship(metrics, attack({"svm": {"pgd": 20}, "adv": {"pgd": 22}}), GATE)
    assert ship["for_robustness"] is None
    assert "Need robustness" not in _ship_section({"ship": ship})
