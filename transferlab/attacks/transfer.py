"""Transfer attacks: craft adversarials on a source model, evaluate them on other models.

The realistic threat for an adapted model is its public parent: the attacker downloads the
ImageNet backbone with its ImageNet head and never sees the adapted head. That model predicts
ImageNet classes, not the dataset's, so its untargeted loss cannot use the dataset label. We
push it away from its own clean top-1 ImageNet class instead (maximise the cross-entropy at that
class, its ``transferlab.inference.predict``): whatever the features encoded about the image is
disturbed, and the dataset head on top of the same features is the victim.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from transferlab.attacks.base import Attack
from transferlab.inference import predict
from transferlab.progress import progress

log = logging.getLogger(__name__)


def craft(
    model: nn.Module, attack: Attack, x01: Tensor, y: Tensor, *, batch_size: int, name: str = ""
) -> Tensor:
    """(N, C, H, W) adversarials of ``attack`` on ``model`` for labels ``y``, batch by batch."""
    starts = range(0, len(x01), batch_size)
    bar = progress(starts, desc=f"transfer: crafting on {name or 'source'}", unit="batch")
    return torch.cat(
        [attack(model, x01[i : i + batch_size], y[i : i + batch_size]).x_adv for i in bar]
    )


def transfer_matrix(
    sources: Mapping[str, tuple[nn.Module, Tensor]],
    targets: Mapping[str, nn.Module],
    x01: Tensor,
    y: Tensor,
    *,
    attack: Attack,
    batch_size: int = 16,
) -> tuple[list[dict], dict[str, Tensor]]:
    """Every source's adversarials evaluated on every target.

    Args:
        sources: name -> (model, labels (N,) the attack moves away from: dataset labels for an
            adapted model, its own clean prediction for the ImageNet model).
        targets: name -> eval-mode model predicting the dataset's classes.
        x01: (N, C, H, W) clean images in [0, 1]. y: (N,) dataset labels.
        attack: a white-box attack (e.g. MI-FGSM, which transfers better than PGD).

    Returns:
        Rows (source, target, clean_acc, robust_acc, success_rate on the target's correct
        images, source_success: fraction of images on which the source itself was fooled),
        and the adversarial images per source.
    """
    rows: list[dict] = []
    adversarials: dict[str, Tensor] = {}
    clean = {t: predict(m, x01, batch_size=batch_size) == y for t, m in targets.items()}
    for s_name, (s_model, s_labels) in sources.items():
        x_adv = craft(s_model, attack, x01, s_labels, batch_size=batch_size, name=s_name)
        adversarials[s_name] = x_adv
        source_success = float(
            (predict(s_model, x_adv, batch_size=batch_size) != s_labels).float().mean()
        )
        for t_name, t_model in targets.items():
            correct = clean[t_name]
            still = predict(t_model, x_adv, batch_size=batch_size) == y
            flipped = correct & ~still
            rows.append(
                {
                    "source": s_name,
                    "target": t_name,
                    "attack": attack.name,
                    "eps": attack.eps,
                    "white_box": s_name == t_name,
                    "clean_acc": float(correct.float().mean()),
                    "robust_acc": float((correct & still).float().mean()),
                    "success_rate": float(flipped.sum() / correct.sum()) if correct.any() else 0.0,
                    "source_success": source_success,
                }
            )
            log.info("transfer %s -> %s: robust %.3f", s_name, t_name, rows[-1]["robust_acc"])
    return rows, adversarials
