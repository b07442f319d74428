"""The robustness regression gate: may a candidate model version replace the champion?

A pure decision, so it is tested as a table: the registry calls live in ``transferlab.tracking``.

The gate judges robust accuracy under the strongest evaluation the run has: by default
(``gate.attack: strongest``) an image counts as robust only if it survives every attack that ran
at ``gate.eps`` (the per-image worst case, as AutoAttack reports it), so PGD's verdict is never
replaced by FGSM's. The champion changes only on differences beyond the noise: a paired McNemar
test on the same test images when both versions' per-image outcomes are known, else non-
overlapping 95% Wilson intervals.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from transferlab.config import GateParams
from transferlab.eps import Eps
from transferlab.stats import LOSS, TIE, WIN, mcnemar, overlap_verdict, wilson

STRONGEST = "strongest"
INCOMPARABLE = "incomparable"


@dataclass(frozen=True)
class GateMetrics:
    """What the gate judges, on the attacked test images.

    Attributes:
        clean_acc, robust_acc: accuracies in [0, 1] (None when not measured).
        n: number of images behind them (0: unknown, e.g. a champion judged before intervals).
        clean_outcomes, robust_outcomes: per image, 1 = right (robust: before and after the
            attack), in ``data/split.csv`` order; None when unknown.
        images: digest of the test images' content; equal digests mean the outcomes can be paired.
        attack: the attack(s) the robust accuracy is under, for the reasons.
    """

    clean_acc: float | None
    robust_acc: float | None
    n: int = 0
    clean_outcomes: tuple[int, ...] | None = None
    robust_outcomes: tuple[int, ...] | None = None
    images: str = ""
    attack: str = ""


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
    return Eps(eps).key


def images_digest(sha256s: list[str]) -> str:
    """Names an ordered list of test images by their content hashes."""
    return hashlib.sha256("\n".join(sha256s).encode()).hexdigest()[:16]


def metrics_from_summary(summary: dict, method: str, attack: str, eps: float) -> GateMetrics:
    """A method's clean accuracy and its robust accuracy under ``attack`` at ``eps``, from the
    numbers alone (no intervals).

    Args:
        summary: ``metrics/attack.json["summary"]``: method -> {"clean_acc", attack -> {eps_k/255}}.
        method: e.g. ``"svm"``.
        attack: e.g. ``"pgd"``.
        eps: pixel-space eps in [0, 1]; it must be one of the swept values to be found.
    """
    entry = summary.get(method, {})
    robust = entry.get(attack, {}).get(eps_key(eps))
    return GateMetrics(clean_acc=entry.get("clean_acc"), robust_acc=robust, attack=attack)


def gate_metrics(attack_json: dict, method: str, attack: str, eps: float) -> GateMetrics:
    """What the gate judges for ``method``, from ``metrics/attack.json``.

    Args:
        attack_json: the whole file: ``summary``, and (written since intervals exist)
            ``outcomes`` (per-image) and ``images`` (their digest).
        attack: an attack name, or ``"strongest"``: per image, robust only if it survives every
            attack that ran at ``eps``.
        eps: pixel-space eps; it must be one of the swept values to be found.
    """
    summary = attack_json.get("summary", {})
    entry = summary.get(method, {})
    key = eps_key(eps)
    ran = [a for a, per_eps in entry.items() if isinstance(per_eps, dict) and key in per_eps]
    names = ran if attack == STRONGEST else [a for a in ran if a == attack]
    label = f"{attack} ({', '.join(ran)})" if attack == STRONGEST else attack
    outcomes = attack_json.get("outcomes", {}).get(method)
    if not names:
        return GateMetrics(entry.get("clean_acc"), None, attack=label)
    if outcomes is None:
        # an attack.json from before per-image outcomes: the weakest robust accuracy of those run
        return GateMetrics(entry.get("clean_acc"), min(entry[a][key] for a in names), attack=label)
    clean = tuple(int(v) for v in outcomes["clean"])
    robust = tuple(int(all(outcomes[a][key][i] for a in names)) for i in range(len(clean)))
    n = len(clean)
    return GateMetrics(
        clean_acc=sum(clean) / n if n else None,
        robust_acc=sum(robust) / n if n else None,
        n=n,
        clean_outcomes=clean,
        robust_outcomes=robust,
        images=attack_json.get("images", ""),
        attack=label,
    )


def pack_outcomes(outcomes: tuple[int, ...] | None) -> str:
    """Per-image 0/1 outcomes as ``"<n>:<hex>"`` (4 images a character: 32k images fit an MLflow
    tag); "" for None."""
    if outcomes is None:
        return ""
    bits = "".join("1" if v else "0" for v in outcomes)
    padded = bits + "0" * (-len(bits) % 4)
    digits = "".join(f"{int(padded[i : i + 4], 2):x}" for i in range(0, len(padded), 4))
    return f"{len(bits)}:{digits}"


def unpack_outcomes(text: str | None) -> tuple[int, ...] | None:
    """The inverse of :func:`pack_outcomes`; None for "" or a malformed value."""
    if not text or ":" not in text:
        return None
    n_text, hexdigits = text.split(":", 1)
    try:
        n = int(n_text)
        bits = "".join(f"{int(c, 16):04b}" for c in hexdigits)
    except ValueError:
        return None
    return tuple(int(b) for b in bits[:n]) if len(bits) >= n else None


def to_tags(m: GateMetrics) -> dict[str, str]:
    """The ``gate.*`` tags that let a later gate run compare against this version."""
    return {
        "gate.clean_acc": str(m.clean_acc),
        "gate.robust_acc": str(m.robust_acc),
        "gate.n": str(m.n),
        "gate.clean_outcomes": pack_outcomes(m.clean_outcomes),
        "gate.robust_outcomes": pack_outcomes(m.robust_outcomes),
        "gate.images": m.images,
        "gate.judged_under": m.attack,
    }


def from_tags(tags: dict[str, str]) -> GateMetrics:
    """A champion's metrics from its ``gate.*`` tags (older versions have only the two rates)."""

    def num(key: str) -> float | None:
        value = tags.get(key)
        return None if value in (None, "", "None") else float(value)

    n = tags.get("gate.n", "0")
    return GateMetrics(
        clean_acc=num("gate.clean_acc"),
        robust_acc=num("gate.robust_acc"),
        n=int(n) if n.isdigit() else 0,
        clean_outcomes=unpack_outcomes(tags.get("gate.clean_outcomes")),
        robust_outcomes=unpack_outcomes(tags.get("gate.robust_outcomes")),
        images=tags.get("gate.images", ""),
        attack=tags.get("gate.judged_under", tags.get("gate.attack", "")),
    )


def compare(
    candidate: GateMetrics, champion: GateMetrics, name: str, alpha: float
) -> tuple[str, str]:
    """(verdict of the candidate against the champion on metric ``name``, how it was judged).

    Paired McNemar when both have per-image outcomes on the same images, else the Wilson
    intervals' overlap when both know their image count, else "unknown".
    """
    value, best = getattr(candidate, name), getattr(champion, name)
    if name == "robust_acc" and candidate.attack != champion.attack:
        return INCOMPARABLE, f"the champion was judged under {champion.attack or 'another attack'}"
    out_field = name.replace("_acc", "_outcomes")
    a, b = getattr(candidate, out_field), getattr(champion, out_field)
    if a is not None and b is not None and candidate.images == champion.images and len(a) == len(b):
        t = mcnemar(a, b, alpha=alpha)
        return t.verdict, f"paired McNemar mid-p {t.p_value:.3g}, {t.only_a} vs {t.only_b} images"
    if candidate.n and champion.n:
        ci_a = wilson(round(value * candidate.n), candidate.n, confidence=1 - alpha)
        ci_b = wilson(round(best * champion.n), champion.n, confidence=1 - alpha)
        return overlap_verdict(ci_a, ci_b), (
            f"intervals [{ci_a[0]:.3f}, {ci_a[1]:.3f}] vs [{ci_b[0]:.3f}, {ci_b[1]:.3f}]"
        )
    return "unknown", "no image count to judge the noise by"


def decide(candidate: GateMetrics, champion: GateMetrics | None, gate: GateParams) -> GateDecision:
    """Promote only if both floors are cleared and, against a champion, the candidate is
    significantly better on clean or robust accuracy and significantly worse on neither.

    A difference counts only beyond the noise (``gate.alpha``: paired test or intervals, see
    :func:`compare`) and, for a regression, also beyond ``gate.max_drop``. A tie keeps the
    champion: the alias does not move on noise. A champion without numbers is replaced.

    Args:
        candidate: the new model version's metrics.
        champion: the current champion's metrics, or None when there is no champion yet.
        gate: ``min_clean_acc``, ``min_robust_acc``, ``alpha``, ``max_drop``.

    Returns:
        The decision with one reason per check (failures first, so the first reason explains it).
    """
    fails: list[str] = []
    passes: list[str] = []
    under = f" under {candidate.attack}" if candidate.attack else ""
    checks = (
        ("clean_acc", candidate.clean_acc, gate.min_clean_acc),
        (f"robust_acc{under}", candidate.robust_acc, gate.min_robust_acc),
    )
    for name, value, floor in checks:
        if value is None:
            fails.append(f"{name} was not measured (is eps {Eps(gate.eps).label} in the sweep?)")
        elif value < floor:
            fails.append(f"{name} {value:.4f} < floor {floor:.4f}")
        else:
            passes.append(f"{name} {value:.4f} >= floor {floor:.4f}")
    if champion is None:
        passes.append("no current champion")
        return GateDecision(promote=not fails, reasons=tuple(fails + passes))
    wins = 0
    verdicts: list[str] = []
    for name in ("clean_acc", "robust_acc"):
        value, best = getattr(candidate, name), getattr(champion, name)
        if value is None:
            continue  # already a failure above
        if best is None:
            passes.append(f"champion has no {name} to compare")
            continue
        verdict, how = compare(candidate, champion, name, gate.alpha)
        verdicts.append(verdict)
        said = f"{name} {value:.4f} vs champion {best:.4f}"
        if verdict == INCOMPARABLE:
            # e.g. a champion judged under FGSM alone: its number says nothing about this one
            passes.append(f"{said}: not comparable, not held against it ({how})")
        elif verdict == "unknown":
            # a champion judged before intervals: only a drop past max_drop counts
            if value < best - gate.max_drop:
                fails.append(f"{said}: falls more than {gate.max_drop:.4f} ({how})")
            else:
                passes.append(f"{said}: within {gate.max_drop:.4f} ({how})")
        elif verdict == LOSS and value < best - gate.max_drop:
            fails.append(f"{said}: significantly worse ({how})")
        elif verdict == WIN:
            wins += 1
            passes.append(f"{said}: significantly better ({how})")
        else:
            passes.append(f"{said}: {TIE} ({how})")
    judged = [v for v in verdicts if v not in ("unknown", INCOMPARABLE)]
    if judged and not wins and not fails:
        fails.append(
            "not significantly better than the champion on clean or robust accuracy: "
            "the champion stays (the alias never moves on noise)"
        )
    return GateDecision(promote=not fails, reasons=tuple(fails + passes))
