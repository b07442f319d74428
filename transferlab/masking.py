"""Gradient-masking probes: attacks whose results an honest model orders in known ways.

A model that hides its gradients (a non-differentiable input quantiser, a saturated softmax,
randomness) looks robust to gradient attacks without being robust. Three probes expose it
(Carlini et al. 2019, "On evaluating adversarial robustness", section 5):

* PGD with a growing number of steps of a fixed size (eps / 4, from the clean image) at one eps:
  more steps reach further into the eps-ball, so an honest model loses accuracy (even a linear
  one, which one full-size step would fool as well as many); a masked one stays where the first
  step left it. Restarts (from random starts) may be added to the budget.
* PGD at a huge eps (64/255): there every honest model falls to ~0%.
* Square, which never uses gradients, at the same eps: it must not beat the white-box attacks.

``evaluate.masking_rows`` runs the probes and returns rows like ``robustness_sweep``'s, tagged
with a ``probe`` key; ``masking_flags`` (through ``evaluate.sanity_flags``) judges them. This
module imports nothing of the package, so ``evaluate`` can import it without a cycle.
"""

from __future__ import annotations

# An eps at which every honest ImageNet-scale model is at ~0% under PGD.
LARGE_EPS = 64 / 255
# Robust accuracy at LARGE_EPS above this is suspicious.
LARGE_EPS_MAX_ACC = 0.05


def masking_flags(rows: list[dict]) -> list[dict]:
    """Flags (level "warn": a sign of gradient masking, not proof) from probe rows; rows
    without a ``probe`` key are ignored. Rows of different ``model``s are judged apart."""
    flags = []
    budgets: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("probe") == "pgd_budget":
            budgets.setdefault((r.get("model"), r["eps"]), []).append(r)
        if r.get("probe") == "large_eps" and r["robust_acc"] > LARGE_EPS_MAX_ACC:
            flags.append(_flag(r, f"PGD at large eps reaches ~0% (<= {LARGE_EPS_MAX_ACC:.0%})"))
    for series in budgets.values():
        series = sorted(series, key=lambda r: r["budget"])
        weak, strong = series[0], series[-1]
        if (
            len(series) > 1
            and weak["robust_acc"] > 0
            and strong["robust_acc"] >= weak["robust_acc"]
        ):
            flags.append(_flag(strong, "robust accuracy falls as PGD steps/restarts grow"))
    return flags


def _flag(row: dict, check: str) -> dict:
    where = {"attack": row["attack"], "eps": row["eps"], "robust_acc": row["robust_acc"]}
    if "model" in row:
        where = {"model": row["model"], **where}
    return {"level": "warn", "check": f"{check} (else gradient masking?)", **where}
