"""Clean and robust metrics, and the sanity checks that keep them honest."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from transferlab.atomic import atomic_write
from transferlab.attacks import BLACKBOX_ATTACKS, Attack, AttackResult, make_attack, sweep
from transferlab.eps import Eps
from transferlab.inference import logits
from transferlab.masking import LARGE_EPS, masking_flags
from transferlab.progress import progress
from transferlab.stats import wilson

log = logging.getLogger(__name__)

# Bump when a shard record's meaning changes, so stale work folders are not reused.
SHARD_VERSION = 1
# The row key of the per-image outcomes (1 = right before and after the attack); a list, so
# it goes to metrics/attack.json's "outcomes", not into the CSV.
OUTCOMES = "robust_outcomes"
CLEAN_OUTCOMES = "clean_outcomes"


def _stats(values: Tensor) -> tuple[float, float]:
    return (float(values.mean()), float(values.median())) if len(values) else (0.0, 0.0)


def robustness_sweep(
    model: nn.Module,
    x01: Tensor,
    y: Tensor,
    *,
    attacks: tuple[str, ...],
    eps: tuple[float, ...],
    batch_size: int = 16,
    options: Mapping[str, Mapping[str, object]] | None = None,
    targeted: Collection[str] = (),
    store: ShardStore | None = None,
    model_key: str = "",
    label: str = "",
) -> list[dict]:
    """Attack ``model`` with each attack at each eps, batch by batch (one shard per batch).

    Args:
        model: eval-mode classifier, (N, 3, H, W) in [0, 1] -> (N, K) logits.
        x01: (N, 3, H, W) images in [0, 1]. y: (N,) true labels.
        attacks: registry names (``transferlab.attacks.ATTACKS``).
        eps: L-inf budgets in pixel space.
        options: per attack name, hyperparameters for ``make_attack`` (steps, max_queries...).
        targeted: attack names run targeted at each image's least-likely clean class.
        store: where finished shards are kept; a shard found there is not recomputed, so a
            killed sweep resumes where it stopped.
        model_key: digest naming the model's weights (part of every shard key).
        label: the model's name, for the progress bar.

    Returns:
        One row per (attack, eps): clean and robust accuracy (right before and after the
        attack, RobustBench's convention) with their 95% Wilson intervals (``*_ci_low``,
        ``*_ci_high``) and the per-image outcomes (``OUTCOMES``), success rate on the images
        the model got right, mean/median L-inf and L2 of the perturbation, queries
        (mean/median per image), gradient batches, seconds, and ``model_unchanged`` (eval mode
        and every buffer, BatchNorm statistics included, bit-identical after the attack).
    """
    options = options or {}
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    clean_logits = logits(model, x01, batch_size=batch_size)
    clean_pred = clean_logits.argmax(1)
    least_likely = clean_logits.argmin(1)
    correct = clean_pred == y
    clean_acc = float(correct.float().mean())
    rows = []
    total = len(attacks) * len(eps) * ((len(x01) + batch_size - 1) // batch_size)
    reused = 0
    with progress(total=total, unit="batch", desc=f"attack {label}".strip()) as bar:
        for name in attacks:
            is_targeted = name in targeted
            sweep_attacks = [
                make_attack(name, eps=e, targeted=is_targeted, **options.get(name, {})) for e in eps
            ]
            shards: list[list[dict]] = [[] for _ in eps]  # per eps, per batch
            # Batch by batch, every eps at once: FGSM's eps share one gradient (FGSM.sweep).
            for i in range(0, len(x01), batch_size):
                xb, yb = x01[i : i + batch_size], y[i : i + batch_size]
                goal = least_likely[i : i + batch_size] if is_targeted else yb
                keys = [shard_key(model_key, a, xb, goal) for a in sweep_attacks]
                found = [store.get(k) if store is not None else None for k in keys]
                todo = [j for j, shard in enumerate(found) if shard is None]
                reused += len(found) - len(todo)
                fresh = run_shards(model, [sweep_attacks[j] for j in todo], xb, goal)
                for j, shard in zip(todo, fresh, strict=True):
                    found[j] = shard
                    if store is not None:
                        store.put(keys[j], shard)
                for per_eps, shard in zip(shards, found, strict=True):
                    per_eps.append(shard)
                bar.update(len(eps))
            for e, per_eps in zip(eps, shards, strict=True):
                rows.append(_row(name, e, per_eps, y, correct, clean_acc, targeted=is_targeted))
    after = model.state_dict()
    unchanged = not any(m.training for m in model.modules()) and all(
        torch.equal(before[k], after[k]) for k in before
    )
    for r in rows:
        r["model_unchanged"] = unchanged
    if store is not None:
        log.info("attack: %d of %d shards reused from %s", reused, total, store.folder)
    return rows


def run_shards(model: nn.Module, attacks: list[Attack], x01: Tensor, goal: Tensor) -> list[dict]:
    """Attack one batch with each attack (``attacks.sweep``: one gradient for FGSM's eps)."""
    return [shard_record(x01, res) for res in sweep(model, x01, goal, attacks)]


def shard_record(x01: Tensor, res: AttackResult) -> dict:
    """What the metrics need of one attacked batch, JSON-able (no images)."""
    out = res.logits.softmax(1)  # the attack's own success check; no second forward pass
    delta = (res.x_adv - x01).flatten(1)
    return {
        "pred_adv": out.argmax(1).tolist(),
        "confidence_adv": out.amax(1).tolist(),
        "success": res.success.tolist(),
        "queries": res.queries.tolist(),
        "linf": delta.abs().amax(1).tolist(),
        "l2": delta.norm(dim=1).tolist(),
        "gradients": res.gradients,
        "seconds": res.seconds,
    }


def shard_key(model_key: str, attack: Attack, x01: Tensor, goal: Tensor) -> str:
    """Content key of one shard: model weights, attack config, the batch's pixels and labels."""
    h = hashlib.sha256()
    h.update(f"{SHARD_VERSION}|{model_key}|{attack!r}".encode())
    h.update(x01.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    h.update(goal.detach().to(torch.int64).cpu().numpy().tobytes())
    return h.hexdigest()


class ShardStore:
    """One JSON file per finished shard under ``folder``, written atomically (temp + rename)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self.path(key).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def put(self, key: str, record: dict) -> None:
        with atomic_write(self.path(key), "w", encoding="utf-8") as f:
            json.dump(record, f)


def _row(
    name: str,
    e: float,
    shards: list[dict],
    y: Tensor,
    correct: Tensor,
    clean_acc: float,
    *,
    targeted: bool,
) -> dict:
    def cat(field: str, dtype=torch.float64) -> Tensor:
        return torch.tensor([v for s in shards for v in s[field]], dtype=dtype)

    pred_adv = cat("pred_adv", torch.int64)
    linf, l2, q = cat("linf"), cat("l2"), cat("queries")
    # an image counts as robust only if it is right before and after the attack
    # (RobustBench's convention), so robust accuracy can never exceed clean accuracy
    robust_mask = correct & (pred_adv == y)
    robust = robust_mask.float()
    flipped = correct & (pred_adv != y)
    clean_lo, clean_hi = wilson(int(correct.sum()), len(y))
    robust_lo, robust_hi = wilson(int(robust_mask.sum()), len(y))
    return {
        "attack": name,
        "family": "blackbox" if name in BLACKBOX_ATTACKS else "whitebox",
        "targeted": targeted,
        "eps": e,
        "n": len(y),
        "clean_acc": clean_acc,
        "robust_acc": float(robust.mean()) if len(y) else 0.0,
        "clean_acc_ci_low": clean_lo,
        "clean_acc_ci_high": clean_hi,
        "robust_acc_ci_low": robust_lo,
        "robust_acc_ci_high": robust_hi,
        "success_rate": float(flipped.sum() / correct.sum()) if correct.any() else 0.0,
        "target_rate": float(cat("success", torch.bool).float().mean()) if targeted else None,
        "linf_mean": _stats(linf)[0],
        "linf_median": _stats(linf)[1],
        "l2_mean": _stats(l2)[0],
        "l2_median": _stats(l2)[1],
        "queries_mean": _stats(q)[0],
        "queries_median": _stats(q)[1],
        "gradient_batches": sum(s["gradients"] for s in shards),
        "seconds": sum(s["seconds"] for s in shards),
        "max_linf": float(linf.max()) if len(linf) else 0.0,
        # per image, right before and after the attack: for paired tests between models
        OUTCOMES: robust_mask.int().tolist(),
        CLEAN_OUTCOMES: correct.int().tolist(),
    }


def scalar_fields(row: dict) -> dict:
    """A sweep row without its per-image lists (what the CSV and MLflow take)."""
    return {k: v for k, v in row.items() if k not in (OUTCOMES, CLEAN_OUTCOMES)}


def attack_evidence(rows: list[dict]) -> tuple[dict, dict]:
    """Per model, the intervals and per-image outcomes of ``metrics/attack.json``.

    Args:
        rows: sweep rows with a ``model`` key.

    Returns:
        intervals: model -> {"clean_acc": [low, high], attack -> {eps_key: [low, high]}};
        outcomes: model -> {"clean": [0/1 per image], attack -> {eps_key: [0/1 per image]}},
        every model's images in the same (``data/split.csv``) order, so two models can be
        compared image by image (``transferlab.stats.mcnemar``).
    """
    intervals: dict[str, dict] = {}
    outcomes: dict[str, dict] = {}
    for r in rows:
        m = r["model"]
        iv = intervals.setdefault(m, {"clean_acc": [r["clean_acc_ci_low"], r["clean_acc_ci_high"]]})
        iv.setdefault(r["attack"], {})[Eps(r["eps"]).key] = [
            r["robust_acc_ci_low"],
            r["robust_acc_ci_high"],
        ]
        oc = outcomes.setdefault(m, {"clean": r[CLEAN_OUTCOMES]})
        oc.setdefault(r["attack"], {})[Eps(r["eps"]).key] = r[OUTCOMES]
    return intervals, outcomes


# Iterative white-box attacks: with more budget they must not do worse (up to their randomness).
MONOTONE_ATTACKS = ("pgd", "bim", "mifgsm")


def sanity_flags(rows: list[dict]) -> list[dict]:
    """Checks every run reports. ``level`` is "fail" (a bug), "warn" (suspicious, e.g. gradient
    masking) or "note" (legitimate but odd, e.g. FGSM doing better at a larger eps).

    Rows may carry a ``model`` key; checks compare rows of the same model only.
    """
    flags = []
    for r in rows:
        if r["eps"] == 0 and abs(r["robust_acc"] - r["clean_acc"]) > 1e-9:
            flags.append({"level": "fail", "check": "eps=0 gives robust = clean", **_where(r)})
        if r["max_linf"] > r["eps"] + 1e-6:
            flags.append({"level": "fail", "check": "perturbation within eps", **_where(r)})
        if r["robust_acc"] > r["clean_acc"] + 1e-9:
            flags.append({"level": "fail", "check": "robust <= clean", **_where(r)})
        if r.get("model_unchanged") is False:
            flags.append(
                {"level": "fail", "check": "model in eval mode, BN stats unchanged", **_where(r)}
            )
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("model"), r["attack"]), []).append(r)
    for (_, name), series in groups.items():
        series = sorted(series, key=lambda r: r["eps"])
        for a, b in zip(series, series[1:], strict=False):
            rise = b["robust_acc"] - a["robust_acc"]
            if rise > 1e-9:
                # A rise of one image can be a random start's luck (warn: add steps/restarts);
                # more is a broken attack. FGSM and black-box attacks may rise: a note.
                one_image = 1 / max(b["n"], 1) + 1e-9
                level = "note"
                if name in MONOTONE_ATTACKS:
                    level = "fail" if rise > one_image else "warn"
                flags.append(
                    {"level": level, "check": "robust accuracy does not rise with eps", **_where(b)}
                )
    by_point: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if not r.get("targeted"):
            by_point.setdefault((r.get("model"), r["eps"]), {})[r["attack"]] = r
    for point in by_point.values():
        fgsm, pgd = point.get("fgsm"), point.get("pgd")
        # one image of slack: PGD's random start can lose an image FGSM's exact step gets
        if fgsm and pgd and pgd["robust_acc"] > fgsm["robust_acc"] + 1 / max(pgd["n"], 1) + 1e-9:
            flags.append({"level": "fail", "check": "PGD robust <= FGSM robust", **_where(pgd)})
        white = [r for r in point.values() if r.get("family", "whitebox") == "whitebox"]
        best_white = min((r["robust_acc"] for r in white), default=None)
        for r in point.values():
            if (
                r.get("family") == "blackbox"
                and best_white is not None
                and r["robust_acc"] < best_white - 1e-9
            ):
                flags.append(
                    {
                        "level": "warn",
                        "check": "black-box robust >= white-box (else gradient masking?)",
                        **_where(r),
                    }
                )
    return flags + masking_flags(rows)


def _where(row: dict) -> dict:
    where = {"attack": row["attack"], "eps": row["eps"]}
    if "model" in row:
        where = {"model": row["model"], **where}
    return where


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
