"""The robustness regression gate: may a candidate model version replace the champion?

A pure decision, so it is tested as a table: the registry calls live in ``transferlab.tracking``.
"""

from __future__ import annotations

from dataclasses import dataclass

from transferlab.config import GateParams


@dataclass(frozen=True)
class GateMetrics:
    """What the gate judges: accuracies in [0, 1] on the test images (None when not measured)."""

    clean_acc: float | None
    robust_acc: float | None


@dataclass(frozen=True)
class GateDecision:
    """``promote`` and every reason behind it, failed checks first."""

    promote: bool
    reasons: tuple[str, ...]

    @property
    def decision(self) -> str:
        return "promote" if self.promote else "keep"


def eps_key(eps: float) -> str:
    """The key ``stages.attack`` writes for one eps in ``metrics/attack.json``: ``eps_4/255``."""
    return f"eps_{eps * 255:g}/255"


def metrics_from_summary(summary: dict, method: str, attack: str, eps: float) -> GateMetrics:
    """Pick a method's clean accuracy and its robust accuracy at ``eps`` from the attack summary.

    Args:
        summary: ``metrics/attack.json["summary"]``: method -> {"clean_acc", attack -> {eps_k/255}}.
        method: e.g. ``"svm"``.
        attack: e.g. ``"fgsm"``.
        eps: pixel-space eps in [0, 1]; it must be one of the swept values to be found.
    """
    entry = summary.get(method, {})
    robust = entry.get(attack, {}).get(eps_key(eps))
    return GateMetrics(clean_acc=entry.get("clean_acc"), robust_acc=robust)


def decide(candidate: GateMetrics, champion: GateMetrics | None, gate: GateParams) -> GateDecision:
    """Promote only if both floors are cleared and neither metric regresses past ``max_drop``.

    Args:
        candidate: the new model version's metrics.
        champion: the current champion's metrics, or None when there is no champion yet.
        gate: thresholds (``min_clean_acc``, ``min_robust_acc``, ``max_drop``).

    Returns:
        The decision with one reason per check (failures first, so the first reason explains it).
    """
    fails: list[str] = []
    passes: list[str] = []
    checks = (
        ("clean_acc", candidate.clean_acc, gate.min_clean_acc),
        ("robust_acc", candidate.robust_acc, gate.min_robust_acc),
    )
    for name, value, floor in checks:
        if value is None:
            fails.append(f"{name} was not measured (is eps {gate.eps * 255:g}/255 in the sweep?)")
        elif value < floor:
            fails.append(f"{name} {value:.4f} < floor {floor:.4f}")
        else:
            passes.append(f"{name} {value:.4f} >= floor {floor:.4f}")
    if champion is None:
        passes.append("no current champion")
    else:
        for name, value, best in (
            ("clean_acc", candidate.clean_acc, champion.clean_acc),
            ("robust_acc", candidate.robust_acc, champion.robust_acc),
        ):
            if value is None:
                continue  # already a failure above
            if best is None:
                passes.append(f"champion has no {name} to compare")
            elif value < best - gate.max_drop:
                fails.append(
                    f"{name} {value:.4f} falls more than {gate.max_drop:.4f} below "
                    f"champion {best:.4f}"
                )
            else:
                passes.append(
                    f"{name} {value:.4f} within {gate.max_drop:.4f} of champion {best:.4f}"
                )
    return GateDecision(promote=not fails, reasons=tuple(fails + passes))
