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

``masking_rows`` runs the probes and returns rows like ``robustness_sweep``'s, tagged with a
``probe`` key; ``evaluate.sanity_flags`` judges them alongside the sweep's rows.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

# An eps at which every honest ImageNet-scale model is at ~0% under PGD.
LARGE_EPS = 64 / 255
# Robust accuracy at LARGE_EPS above this is suspicious.
LARGE_EPS_MAX_ACC = 0.05


def masking_rows(
    model: nn.Module,
    x01: Tensor,
    y: Tensor,
    *,
    eps: float,
    budgets: Sequence[tuple[int, int]] = ((1, 1), (4, 1), (20, 1)),
    square_queries: int = 200,
    large_eps: float = LARGE_EPS,
    seed: int = 0,
    batch_size: int = 16,
) -> list[dict]:
    """Run the probes on ``model``.

    Args:
        model: eval-mode classifier, (N, 3, H, W) in [0, 1] -> (N, K) logits.
        x01: (N, 3, H, W) images in [0, 1]. y: (N,) labels.
        eps: the L-inf budget of the budget and black-box probes (e.g. ``attack.report_eps``).
        budgets: PGD (steps, restarts) pairs; steps of eps / 4, a random start only with
            more than one restart.
        square_queries: Square's budget per image (0: no black-box probe).
        large_eps: the eps of the large-eps probe.

    Returns:
        Rows as ``robustness_sweep`` returns them plus ``probe`` ("pgd_budget", "large_eps",
        "blackbox") and, for the budget probe, ``budget`` (gradients per image per restart x
        restarts). Attack names say the budget: ``pgd_10x2`` is 10 steps, 2 restarts.
    """
    from transferlab.evaluate import robustness_sweep

    def sweep(name: str, e: float, options: dict) -> dict:
        (row,) = robustness_sweep(
            model, x01, y, attacks=(name,), eps=(e,), batch_size=batch_size,
            options={name: {"seed": seed, **options}}, label="masking probe",
        )  # fmt: skip
        return row

    rows = []
    for steps, restarts in budgets:
        # early stop changes no verdict and saves the steps on fooled images
        options = {"steps": steps, "restarts": restarts, "step_size": eps / 4}
        row = sweep("pgd", eps, {**options, "random_start": restarts > 1, "early_stop": True})
        rows.append(
            {**row, "attack": f"pgd_{steps}x{restarts}", "probe": "pgd_budget",
             "budget": steps * restarts}
        )  # fmt: skip
    row = sweep("pgd", large_eps, {"steps": max(s for s, _ in budgets), "early_stop": True})
    rows.append({**row, "attack": "pgd_large_eps", "probe": "large_eps"})
    if square_queries:
        row = sweep("square", eps, {"max_queries": square_queries})
        rows.append({**row, "attack": "square_probe", "probe": "blackbox"})
    return rows


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
