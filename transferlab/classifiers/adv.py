"""Adversarial fine-tuning (method ``adv``): train on the attack the model will face.

Madry et al. (2018): each batch is replaced (or, with ``clean_mix``, joined) by its PGD
adversarials, crafted against the current weights, and the loss is the cross-entropy on them.
TRADES (Zhang et al., 2019): the loss is the clean cross-entropy plus ``beta`` times the KL
divergence between the predictions on the clean image and on the adversarial that maximises it.
Two scopes: ``full`` trains backbone and head (like ``full``), ``top`` only the head on a frozen
backbone; the attack goes through the whole network either way (Shafahi et al., 2020). The
training eps ramps up linearly over the first ``ramp_epochs`` (a robust model needs a clean one
to start from). It starts from the ImageNet backbone or from the trained ``full`` model
(``init: full``: the cheap way to a robust model on a CPU).

Model selection and early stopping use ROBUST validation accuracy (PGD at ``eps``), since robust
overfitting is real (Rice et al., 2020). The shared fine-tuning (``classifiers/finetune.py``) and
loop (``classifiers/loop.py``) run it: the same set-up, checkpoint, resume, early stopping and
trials as ``full``; this module supplies the step, the robust validation and the eps ramp.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transferlab.attacks import PGD, project
from transferlab.backbones import Backbone
from transferlab.classifiers.finetune import FinetuneResult, Network, finetune, run_trials
from transferlab.methods import AdvParams

log = logging.getLogger(__name__)


def trades_adversarial(
    net: nn.Module, x: Tensor, *, eps: float, steps: int, step_size: float, generator=None
) -> Tensor:
    """TRADES' inner maximisation: sign steps on KL(f(x') || f(x)) from x + 0.001 N(0, 1),
    projected onto the eps-ball and [0, 1]. (N, C, H, W) in [0, 1] -> same."""
    with torch.no_grad():
        p_clean = F.softmax(net(x).float(), dim=1)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_adv = project(x, x + 0.001 * noise, eps=eps, norm="linf")
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        kl = F.kl_div(F.log_softmax(net(x_adv).float(), dim=1), p_clean, reduction="sum")
        (grad,) = torch.autograd.grad(kl, x_adv)
        x_adv = project(x, x_adv.detach() + step_size * grad.sign(), eps=eps, norm="linf")
    return x_adv.detach()


def ramped_eps(eps: float, step: int, ramp_steps: int) -> float:
    """The training eps after ``step`` optimiser steps: linear from eps / ramp_steps to eps."""
    return eps if ramp_steps <= 0 else eps * min(1.0, (step + 1) / ramp_steps)


def robust_accuracy(
    net: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, batch_size: int, seed: int
) -> float:
    """PGD robust accuracy of an eval-mode ``net`` on (x, y) (early stop: same verdicts)."""
    attack = PGD(eps=eps, steps=steps, seed=seed, early_stop=True)
    correct = 0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        device = next(net.parameters()).device
        correct += int((~attack(net, xb.to(device), yb.to(device)).success).sum())
    return correct / max(1, len(y))


def train_adv(*, params: AdvParams, y_train: Tensor, **kw: Any) -> FinetuneResult:
    """Adversarially fine-tune a backbone + head (updated in place): ``finetune.finetune`` with
    this step, the robust validation and the eps ramp; the body trains with ``scope: full``.

    Args:
        params: the ``adv`` section.
        y_train: (N,) int64 training labels.
        kw: the rest of ``finetune``'s arguments: backbone, head, n_classes, x_train (and
            optionally x_val, y_val, checkpoint, fingerprint, on_epoch_end, device,
            input_size). Images (N, 3, S, S) in [0, 1].

    Returns:
        The fine-tuned result; the modules hold the weights of the best robust val epoch and
        history rows add ``train_eps``.
    """
    per_epoch = math.ceil(len(y_train) / params.batch_size)
    ramp_steps = round(params.ramp_epochs * per_epoch)
    state = {"step": 0}

    def start_epoch(epoch: int) -> dict:
        state["step"] = epoch * per_epoch  # the ramp resumes with the checkpoint
        return {"train_eps": ramped_eps(params.eps, state["step"], ramp_steps)}

    def step(net: Network, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x, y = x.to(net.device), y.to(net.device)
        eps = ramped_eps(params.eps, state["step"], ramp_steps)
        step_size = params.step_size or 2.5 * eps / params.steps  # scales with the ramp
        state["step"] += 1
        # craft against the eval-mode network (no dropout noise in the attack's gradient)
        net.eval()
        with torch.enable_grad():
            if params.loss == "trades":
                x_adv = trades_adversarial(net, x, eps=eps, steps=params.steps, step_size=step_size)
            else:
                attack = PGD(eps=eps, steps=params.steps, step_size=step_size)
                x_adv = project(x, attack.run(net, x, y).x_adv, eps=eps, norm="linf")
        net.train_modes()
        logits_adv = net(x_adv)
        if params.loss == "trades":
            logits = net(x)
            kl = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits, 1), reduction="batchmean")
            return F.cross_entropy(logits, y) + params.beta * kl, logits_adv
        loss = F.cross_entropy(logits_adv, y, label_smoothing=params.label_smoothing)
        if params.clean_mix > 0:
            clean = F.cross_entropy(net(x), y, label_smoothing=params.label_smoothing)
            loss = (1 - params.clean_mix) * loss + params.clean_mix * clean
        return loss, logits_adv

    def validate(net: Network, x_val: Tensor, y_val: Tensor) -> float:
        return robust_accuracy(
            net, x_val, y_val, eps=params.eps, steps=params.val_steps, batch_size=64,
            seed=params.seed,
        )  # fmt: skip

    return finetune(
        name="adv",
        params=params,
        step=step,
        validate=validate,
        on_epoch_start=start_epoch,
        train_body=params.scope == "full",
        y_train=y_train,
        **kw,
    )


def run(params, root: Path) -> dict:
    """The ``adv`` stage: adversarial fine-tuning from ImageNet or ``models/full``, one run per
    trial of ``adv.search`` (the best robust val accuracy kept, ``finetune.run_trials``); writes
    ``models/adv`` and ``metrics/adv.json`` with its cost (seconds, epochs, attack steps per
    batch)."""
    from transferlab.backbones import load_backbone
    from transferlab.classifiers.base import load_classifier
    from transferlab.classifiers.training import make_head
    from transferlab.methods import METHODS

    ap = params.adv
    full = METHODS["full"].model_dir

    def start(classes: list[str]) -> tuple[Backbone, nn.Module]:
        """A fresh copy of the starting backbone and head."""
        if ap.init == "imagenet":
            backbone = load_backbone(params.features.backbone, params.features.pretrained)
            return backbone, make_head(
                ap.head, backbone.feature_dim, len(classes), hidden=ap.hidden, dropout=ap.dropout
            )
        clf = load_classifier(root / full)
        if clf.classes != classes:
            raise ValueError(
                f"{root / full} was trained on classes {clf.classes}, not {classes}: run "
                "`transferlab full` first, or set adv.init: imagenet"
            )
        return clf.backbone, clf.head

    def extra_metrics(res: FinetuneResult) -> dict:
        kept = res.history[res.best_epoch - res.history[0]["epoch"]] if res.history else {}
        return {
            # the cost beside full's: forward+backward passes per batch on top of the update
            "attack_steps_per_batch": ap.steps + (1 if ap.loss == "trades" else 0),
            "val_robust_acc": kept.get("val_acc"),
            "train_eps": ap.eps,
            "trained_parameters": res.trained_parameters,  # the results table's "params"
        }

    return run_trials(
        params,
        root,
        "adv",
        train=train_adv,
        start=start,
        fingerprint_files=(f"{full}/meta.json",) if ap.init == "full" else (),
        extra_metrics=extra_metrics,
    )
