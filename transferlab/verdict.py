"""The report's "What to ship": which method to ship, each method's clean and robust accuracy
with its interval, and where the evidence is a tie.

Pure (no MLflow, no torch): it reads the metric files' contents, so it is tested as a table.

The rule, in order (each comparison paired on the same test images, McNemar at ``alpha``):
1. clean accuracy: the methods not significantly worse than the most accurate one are in;
2. robust accuracy under the gate's attack and eps (the strongest evaluation by default): of
   those, the ones not significantly worse than the most robust stay in;
3. a tie on both: the cheapest to train (training seconds) is recommended, and the page says
   that the others are a tie.

The robust "vs best" column compares every method with the most robust of all of them, and when
that one lost on clean accuracy but is significantly more robust than the pick (an adversarially
fine-tuned model, typically), the verdict names it as the choice for robustness, with its clean
cost: the rule above ranks clean accuracy first, and a user who needs robustness must still see it.
"""

from __future__ import annotations

from transferlab.config import GateParams
from transferlab.gate import GateMetrics, eps_key, gate_metrics
from transferlab.stats import LOSS, TIE, interval_of, mcnemar, overlap_verdict, wilson


def _clean(metrics: dict) -> dict:
    """A method's test accuracy with its interval and per-image outcomes (when stored)."""
    pred, true = metrics.get("test_pred"), metrics.get("test_true")
    acc = metrics.get("test_acc")
    outcomes = None
    n = 0
    if pred is not None and true is not None and len(pred) == len(true) and len(true):
        outcomes = tuple(int(p == t) for p, t in zip(pred, true, strict=True))
        n = len(outcomes)
    lo, hi = metrics.get("test_acc_ci_low"), metrics.get("test_acc_ci_high")
    if acc is not None and n and (lo is None or hi is None):
        lo, hi = wilson(sum(outcomes), n)
    return {"acc": acc, "ci": None if lo is None else [lo, hi], "n": n, "outcomes": outcomes}


def _verdict(a: dict, b: dict, alpha: float) -> tuple[str, str]:
    """(a vs b: "win" | "loss" | "tie", how it was judged)."""
    pa, pb = a["outcomes"], b["outcomes"]
    if pa is not None and pb is not None and len(pa) == len(pb):
        t = mcnemar(pa, pb, alpha=alpha)
        return t.verdict, f"McNemar mid-p {t.p_value:.2g}"
    if a["ci"] is not None and b["ci"] is not None:
        return overlap_verdict(tuple(a["ci"]), tuple(b["ci"])), "interval overlap"
    return TIE, "no interval"


def _robust(g: GateMetrics) -> dict:
    ci = None
    if g.robust_acc is not None and g.n:
        ci = list(interval_of(g.robust_acc, g.n))
    return {"acc": g.robust_acc, "ci": ci, "n": g.n, "outcomes": g.robust_outcomes}


def _survivors(
    entries: dict[str, dict], names: list[str], alpha: float
) -> tuple[list[str], str, dict]:
    """Of ``names``, those not significantly worse than the best (by point estimate)."""
    measured = [m for m in names if entries[m]["acc"] is not None]
    if not measured:
        return names, "", {}
    best = max(measured, key=lambda m: entries[m]["acc"])
    verdicts = {m: _verdict(entries[m], entries[best], alpha) for m in measured if m != best}
    keep = [best] + [m for m, (v, _) in verdicts.items() if v != LOSS]
    return keep, best, verdicts


def what_to_ship(
    metrics_by_method: dict[str, dict], attack_json: dict | None, gate: GateParams
) -> dict:
    """The verdict the report opens with.

    Args:
        metrics_by_method: method -> its ``metrics/<method>.json``.
        attack_json: ``metrics/attack.json`` (None before the attack stage ran).
        gate: the gate's section: its attack and eps say which robust accuracy is judged,
            ``alpha`` the significance level.

    Returns:
        {"recommended", "why", "attack", "eps", "methods": {name: {"clean": {acc, ci, n},
        "robust": {acc, ci, n}, "clean_vs_best": verdict, "robust_vs_best": verdict}},
        "ties": [names tied with the recommended one on both]}.
    """
    names = list(metrics_by_method)
    clean = {m: _clean(metrics_by_method[m]) for m in names}
    robust_g = {m: gate_metrics(attack_json or {}, m, gate.attack, gate.eps) for m in names}
    robust = {m: _robust(g) for m, g in robust_g.items()}
    attack_label = next((g.attack for g in robust_g.values() if g.robust_acc is not None), "")
    alpha = gate.alpha
    clean_in, clean_best, clean_v = _survivors(clean, names, alpha)
    robust_in, robust_best, _ = _survivors(robust, clean_in, alpha)
    _, robust_top, robust_all_v = _survivors(robust, names, alpha)
    seconds = {
        m: metrics_by_method[m].get("train_seconds", metrics_by_method[m].get("fit_seconds"))
        for m in names
    }
    pick = min(robust_in, key=lambda m: (seconds[m] is None, seconds[m] or 0.0))
    ties = [m for m in robust_in if m != pick]
    why = []
    if len(clean_in) == 1:
        why.append(f"{clean_best} has the highest clean accuracy, significantly")
    else:
        why.append(
            f"clean accuracy: {', '.join(clean_in)} tie (none significantly below {clean_best})"
        )
    if robust_best and len(clean_in) > 1:
        if len(robust_in) == 1:
            why.append(f"of those, {robust_best} is significantly more robust")
        else:
            why.append(f"robust accuracy: {', '.join(robust_in)} tie")
    if ties:
        why.append(f"{pick} is the cheapest of the tied to train")
    out_methods = {}
    for m in names:

        def strip(e: dict) -> dict:
            return {k: e[k] for k in ("acc", "ci", "n")}

        out_methods[m] = {
            "clean": strip(clean[m]),
            "robust": strip(robust[m]),
            "clean_vs_best": "best" if m == clean_best else clean_v.get(m, (TIE, ""))[0],
            "robust_vs_best": "best" if m == robust_top else robust_all_v.get(m, (TIE, ""))[0],
            "train_seconds": seconds[m],
        }
    return {
        "recommended": pick,
        "why": "; ".join(why),
        "ties": ties,
        "for_robustness": _for_robustness(pick, robust_top, robust_all_v, clean, robust),
        "attack": attack_label,
        "eps": eps_key(gate.eps),
        "alpha": alpha,
        "methods": out_methods,
    }


def _for_robustness(pick: str, top: str, verdicts: dict, clean: dict, robust: dict) -> dict | None:
    """The most robust method when it is significantly more robust than the pick: its robust
    gain and clean cost against the pick (None when the pick is as robust as any)."""
    if not top or top == pick or verdicts.get(pick, (TIE, ""))[0] != LOSS:
        return None
    gain = robust[top]["acc"] - robust[pick]["acc"]
    cost = None
    if clean[top]["acc"] is not None and clean[pick]["acc"] is not None:
        cost = clean[pick]["acc"] - clean[top]["acc"]
    return {"method": top, "robust_gain": gain, "clean_cost": cost, "test": verdicts[pick][1]}
