"""Clean and robust metrics, and the sanity checks that keep them honest."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from transferlab.attacks import make_attack

log = logging.getLogger(__name__)


def predict(model: nn.Module, x01: Tensor, *, batch_size: int = 32) -> Tensor:
    """(N,) predicted class indices for images in [0, 1]."""
    with torch.inference_mode():
        return torch.cat(
            [model(x01[i : i + batch_size]).argmax(1) for i in range(0, len(x01), batch_size)]
        )


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
) -> list[dict]:
    """Attack ``model`` with each attack at each eps.

    Args:
        x01: (N, 3, H, W) images in [0, 1]. y: (N,) true labels.

    Returns:
        One row per (attack, eps): clean and robust accuracy, success rate on the images the
        model got right, mean/median L-inf and L2 of the perturbation, queries, seconds.
    """
    clean_pred = predict(model, x01, batch_size=batch_size)
    correct = clean_pred == y
    clean_acc = float(correct.float().mean())
    rows = []
    total = len(attacks) * len(eps) * ((len(x01) + batch_size - 1) // batch_size)
    with tqdm(total=total, unit="batch", desc="attack") as bar:
        for name in attacks:
            for e in eps:
                attack = make_attack(name, eps=e)
                adv, fooled, queries, grads, seconds = [], [], [], 0, 0.0
                for i in range(0, len(x01), batch_size):
                    res = attack(model, x01[i : i + batch_size], y[i : i + batch_size])
                    adv.append(res.x_adv)
                    fooled.append(res.success)
                    queries.append(res.queries)
                    grads += res.gradients
                    seconds += res.seconds
                    bar.update(1)
                x_adv = torch.cat(adv)
                delta = (x_adv - x01).flatten(1)
                linf, l2 = delta.abs().amax(1), delta.norm(dim=1)
                # an image counts as robust only if it is right before and after the attack
                # (RobustBench's convention), so robust accuracy can never exceed clean accuracy
                robust = (correct & ~torch.cat(fooled)).float()
                flipped = correct & torch.cat(fooled)
                q = torch.cat(queries).float()
                rows.append(
                    {
                        "attack": name,
                        "eps": e,
                        "n": len(x01),
                        "clean_acc": clean_acc,
                        "robust_acc": float(robust.mean()),
                        "success_rate": float(flipped.sum() / correct.sum())
                        if correct.any()
                        else 0.0,
                        "linf_mean": _stats(linf)[0],
                        "linf_median": _stats(linf)[1],
                        "l2_mean": _stats(l2)[0],
                        "l2_median": _stats(l2)[1],
                        "queries_mean": _stats(q)[0],
                        "queries_median": _stats(q)[1],
                        "gradient_batches": grads,
                        "seconds": seconds,
                        "max_linf": float(linf.max()) if len(linf) else 0.0,
                    }
                )
    return rows


def sanity_flags(rows: list[dict]) -> list[dict]:
    """Checks every run reports. ``level`` is "fail" (a bug) or "note" (legitimate but odd)."""
    flags = []
    for r in rows:
        if r["eps"] == 0 and abs(r["robust_acc"] - r["clean_acc"]) > 1e-9:
            flags.append({"level": "fail", "check": "eps=0 gives robust = clean", **_where(r)})
        if r["max_linf"] > r["eps"] + 1e-6:
            flags.append({"level": "fail", "check": "perturbation within eps", **_where(r)})
        if r["robust_acc"] > r["clean_acc"] + 1e-9:
            flags.append({"level": "fail", "check": "robust <= clean", **_where(r)})
    by_attack: dict[str, list[dict]] = {}
    for r in rows:
        by_attack.setdefault(r["attack"], []).append(r)
    for name, series in by_attack.items():
        series = sorted(series, key=lambda r: r["eps"])
        for a, b in zip(series, series[1:], strict=False):
            if b["robust_acc"] > a["robust_acc"] + 1e-9:
                level = "note" if name == "fgsm" else "fail"
                flags.append(
                    {"level": level, "check": "robust accuracy does not rise with eps", **_where(b)}
                )
    return flags


def _where(row: dict) -> dict:
    return {"attack": row["attack"], "eps": row["eps"]}
