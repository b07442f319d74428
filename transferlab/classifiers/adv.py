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
overfitting is real (Rice et al., 2020). The shared loop (``classifiers/loop.py``) runs it: the
same checkpoint, resume and early stopping as ``full``; this module supplies the step.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transferlab.attacks import PGD, project

log = logging.getLogger(__name__)


class _Net(nn.Module):
    """Backbone + head as one module on the training device (what the attacks see)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, forward):
        super().__init__()
        self.backbone, self.head, self._forward = backbone, head, forward

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x)


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


def train_adv(
    *,
    backbone,
    head: nn.Module,
    n_classes: int,
    params,
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor | None = None,
    y_val: Tensor | None = None,
    checkpoint: Path | None = None,
    fingerprint: str = "",
    device: torch.device | str | None = None,
    input_size: int | None = None,
    on_epoch_end=None,
):
    """Adversarially fine-tune ``backbone`` + ``head`` (updated in place) with the ``adv``
    section ``params``. Images (N, 3, S, S) in [0, 1], labels (N,) int64.

    Returns:
        The loop's ``LoopResult``; the modules hold the weights of the best robust val epoch.
    """
    from transferlab.classifiers.full import _schedule
    from transferlab.classifiers.loop import epoch_budget, fit, remove_stale_saves
    from transferlab.classifiers.training import (
        augment_batch,
        augmentation,
        make_optimizer,
        resize_to,
        use_bf16,
    )

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = use_bf16(params.precision, device)
    torch.manual_seed(params.seed)
    backbone.to(device)
    head.to(device)
    body = list(backbone.body.parameters())
    train_body = params.scope == "full"
    for p in body:
        p.requires_grad_(train_body)
    for p in head.parameters():
        p.requires_grad_(True)
    groups = [{"params": list(head.parameters()), "lr": params.lr, "name": "head"}]
    if train_body:
        lr = params.lr * params.backbone_lr_ratio
        groups.insert(0, {"params": body, "lr": lr, "name": "backbone"})
    opt = make_optimizer(
        params.optimizer,
        groups,
        lr=params.lr,
        momentum=params.momentum,
        weight_decay=params.weight_decay,
    )
    epochs = epoch_budget(
        epochs=params.epochs,
        min_steps=params.min_steps,
        n_train=len(y_train),
        batch_size=params.batch_size,
    )
    per_epoch = math.ceil(len(y_train) / params.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _schedule(epochs * per_epoch, round(params.warmup_epochs * per_epoch))
    )
    aug = augmentation(x_train.shape[-1]) if params.augment else None
    ramp_steps = round(params.ramp_epochs * per_epoch)
    state = {"step": 0}

    def forward(x: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return head(backbone.features(resize_to(x, input_size))).float()

    net = _Net(backbone, head, forward)

    def train_modes() -> None:
        head.train()
        # BatchNorm keeps its statistics (bn_train: false) and a frozen backbone stays in eval
        backbone.train(train_body)
        if train_body and not params.bn_train:
            for m in backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def start_epoch(epoch: int) -> dict:
        state["step"] = epoch * per_epoch  # the ramp resumes with the checkpoint
        train_modes()
        return {"train_eps": ramped_eps(params.eps, state["step"], ramp_steps)}

    def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if aug is not None:
            x = augment_batch(x, aug)
        x, y = x.to(device), y.to(device)
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
        train_modes()
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

    def validate() -> float:
        return robust_accuracy(
            net, x_val, y_val, eps=params.eps, steps=params.val_steps, batch_size=64,
            seed=params.seed,
        )  # fmt: skip

    has_val = x_val is not None and y_val is not None and len(y_val) > 0
    if checkpoint is not None:
        remove_stale_saves(checkpoint)
        if not params.resume:
            checkpoint.unlink(missing_ok=True)
    res = fit(
        name="adv",
        modules={"backbone": backbone, "head": head},
        optimizer=opt,
        scheduler=sched,
        step=step,
        x_train=x_train,
        y_train=y_train,
        epochs=epochs,
        batch_size=params.batch_size,
        patience=params.patience,
        seed=params.seed,
        n_classes=n_classes,
        validate=validate if has_val else None,
        grad_clip=params.grad_clip,
        on_epoch_start=start_epoch,
        on_epoch_end=on_epoch_end,
        checkpoint=checkpoint,
        config={**params.model_dump(mode="json"), "resume": None, "fingerprint": fingerprint},
        device=device,
    )
    for p in backbone.parameters():
        p.requires_grad_(False)
    backbone.eval()
    head.eval()
    return res


def run(params, root: Path) -> dict:
    """The ``adv`` stage: adversarial fine-tuning from ImageNet or ``models/full``, one run per
    trial of ``adv.search`` (the best robust val accuracy kept); writes ``models/adv`` and
    ``metrics/adv.json`` with its cost (seconds, epochs, attack steps per batch)."""
    import hashlib

    from transferlab.atomic import write_json
    from transferlab.backbones import load_backbone
    from transferlab.classifiers.base import Classifier, load_classifier, save_classifier
    from transferlab.classifiers.loop import choose_trial
    from transferlab.classifiers.training import make_head, predict, split_metrics
    from transferlab.features import split_images
    from transferlab.layout import MANIFEST, PARTS, SPLIT, dataset_classes
    from transferlab.methods import METHODS

    method, ap = METHODS["adv"], params.adv
    classes = dataset_classes(root)
    start = root / METHODS["full"].model_dir

    def initial() -> tuple[nn.Module, nn.Module]:
        """A fresh copy of the starting backbone and head."""
        if ap.init == "imagenet":
            backbone = load_backbone(params.features.backbone, params.features.pretrained)
            return backbone, make_head(
                ap.head, backbone.feature_dim, len(classes), hidden=ap.hidden, dropout=ap.dropout
            )
        clf = load_classifier(start)
        if clf.classes != classes:
            raise ValueError(
                f"{start} was trained on classes {clf.classes}, not {classes}: run "
                "`transferlab full` first, or set adv.init: imagenet"
            )
        return clf.backbone, clf.head

    h = hashlib.sha256(params.section_hash("adv", "features", "data").encode())
    for rel in (MANIFEST, SPLIT, *((f"{start}/meta.json",) if ap.init == "full" else ())):
        h.update((root / rel).read_bytes())
    first = root / method.checkpoint
    imgs = None

    def checkpoint(k: int) -> Path:
        return first if k == 0 else first.with_name(f"{first.stem}.trial{k}{first.suffix}")

    def train(k: int, trial: dict):
        nonlocal imgs
        backbone, head = initial()
        if imgs is None:
            imgs = split_images(root, classes, backbone.spec, background=params.data.background)
        res = train_adv(
            backbone=backbone,
            head=head,
            n_classes=len(classes),
            params=ap.with_trial(trial),
            x_train=imgs["x_train"],
            y_train=imgs["y_train"],
            x_val=imgs["x_val"],
            y_val=imgs["y_val"],
            checkpoint=checkpoint(k),
            fingerprint=h.hexdigest(),
            input_size=ap.image_size,
        )
        return res, backbone, head

    trials = ap.trials()
    (res, backbone, head), selection = choose_trial(
        "adv", trials, train, lambda r: r[0].history[r[0].best_epoch]["val_acc"]
    )
    clf = Classifier(backbone, head, classes, method.name, ap.image_size).eval().cpu()
    preds = {p: predict(clf, imgs[f"x_{p}"], batch_size=32, desc=f"adv {p} set") for p in PARTS}
    metrics = split_metrics(preds, {p: imgs[f"y_{p}"].numpy() for p in PARTS}, classes)
    kept = res.history[res.best_epoch - res.history[0]["epoch"]] if res.history else {}
    metrics.update(
        {
            "history": res.history,
            "best_epoch": res.best_epoch,
            "epochs_run": len(res.history),
            "selection": selection,
            "resumed_from_epoch": res.resumed_from,
            "train_seconds": round(sum(h["seconds"] for h in res.history), 4),
            # the cost beside full's: forward+backward passes per batch on top of the update
            "attack_steps_per_batch": ap.steps + (1 if ap.loss == "trades" else 0),
            "val_robust_acc": kept.get("val_acc"),
            "train_eps": ap.eps,
            "n_train": int(len(imgs["y_train"])),
            "image_size": clf.input_size,
            "sanity": res.sanity,
        }
    )
    save_classifier(clf, root / method.model_dir, pretrained=params.features.pretrained)
    write_json(root / method.metrics_file, metrics)
    for k in range(len(trials)):
        checkpoint(k).unlink(missing_ok=True)
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | None)}
