"""Full fine-tuning: backbone and head train together.

The seed's recipe: a smaller learning rate for the convolutional filters than for the new top
layer (``backbone lr = lr * backbone_lr_ratio``), SGD with momentum, augmentation, and watching
whether training accuracy hits 100% while validation lags (overfitting). On top: linear warmup
then cosine decay, gradient clipping, optional gradual unfreezing (top groups first), bf16
autocast where the hardware has it. The shared loop (``classifiers/loop.py``) runs it: early
stopping, an atomic checkpoint every epoch so a killed run resumes where it stopped, history.

Progress: an epoch bar (train loss and accuracy, val accuracy) over a batch bar (img/s and the
running train loss and accuracy); the kept epoch's figures are logged at INFO, each epoch's at
DEBUG.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from transferlab.backbones import Backbone
from transferlab.classifiers.loop import epoch_budget, fit, remove_stale_saves
from transferlab.classifiers.training import (
    accuracy,
    augment_batch,
    augmentation,
    in_channels_last,
    make_head,
    make_optimizer,
    predict,
    resize_to,
    use_bf16,
    use_channels_last,
)
from transferlab.methods import FullParams

log = logging.getLogger(__name__)


@dataclass
class FullResult:
    """The fine-tuned backbone (updated in place) and head, at the best epoch.

    Attributes:
        history: per epoch: epoch, lr_backbone, lr_head, train_loss, train_acc, val_acc,
            unfrozen_groups, seconds.
        resumed_from: the epoch a checkpoint brought us past (-1: fresh start).
        bf16: whether autocast ran in bf16.
        trained_parameters: the backbone's (without its unused ImageNet head) and the head's.
        sanity: the loop's under-trained check.
    """

    backbone: Backbone
    head: nn.Module
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    resumed_from: int = -1
    bf16: bool = False
    trained_parameters: int = 0
    sanity: dict = field(default_factory=dict)


def _groups(backbone: Backbone, n: int) -> list[list[nn.Parameter]]:
    """Backbone parameters in ``n`` contiguous groups, input side first."""
    params = list(backbone.body.parameters())
    size = math.ceil(len(params) / n)
    return [params[i : i + size] for i in range(0, len(params), size)]


def _set_unfrozen(groups: list[list[nn.Parameter]], k: int) -> None:
    """Unfreeze the top ``k`` groups (closest to the head); freeze the rest."""
    for i, group in enumerate(groups):
        trainable = i >= len(groups) - k
        for p in group:
            p.requires_grad_(trainable)


def _schedule(total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))

    return factor


def train_full(
    *,
    backbone: Backbone,
    n_classes: int,
    params: FullParams,
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor | None = None,
    y_val: Tensor | None = None,
    checkpoint: Path | None = None,
    fingerprint: str = "",
    on_epoch_end: Callable[[dict], None] | None = None,
    device: torch.device | str | None = None,
    input_size: int | None = None,
) -> FullResult:
    """Fine-tune ``backbone`` and a new head (the shared loop, ``loop.fit``, with this step).

    Args:
        backbone: an ImageNet backbone; its weights are updated in place.
        n_classes: number of logits.
        params: the ``full`` section.
        x_train: (N, 3, S, S) images in [0, 1]. y_train: (N,) int64 labels.
        x_val, y_val: validation images and labels (optional: no early stopping without).
        checkpoint: file written atomically after every epoch; with ``params.resume`` an
            existing one whose ``fingerprint`` matches is continued from.
        fingerprint: names the data and settings, so a stale checkpoint is never resumed.
        on_epoch_end: called with each epoch's history row after its checkpoint is written.
        device: defaults to CUDA when available.
        input_size: resize every batch (after augmentation) to this side first, as the stored
            ``Classifier`` does in its forward (None: as given).

    Returns:
        The best backbone + head (by val accuracy; the last epoch without val), in eval mode.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = use_bf16(params.precision, device)
    channels_last = use_channels_last(device)
    # load_backbone's backbones are in channels_last already; another one is converted for the
    # training and handed back in its own layout
    convert = channels_last and not in_channels_last(backbone)
    torch.manual_seed(params.seed)
    head = make_head(
        params.head, backbone.feature_dim, n_classes, hidden=params.hidden, dropout=params.dropout
    )
    backbone.to(device)
    if convert:
        backbone.to(memory_format=torch.channels_last)
    head.to(device)
    # the body and the head train; the backbone's own ImageNet classifier is never used
    body = list(backbone.body.parameters())
    for p in body:
        p.requires_grad_(True)
    groups = _groups(backbone, params.unfreeze_groups)
    opt = make_optimizer(
        params.optimizer,
        [
            {"params": body, "lr": params.lr * params.backbone_lr_ratio, "name": "backbone"},
            {"params": list(head.parameters()), "lr": params.lr, "name": "head"},
        ],
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
    steps_per_epoch = math.ceil(len(y_train) / params.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _schedule(epochs * steps_per_epoch, round(params.warmup_epochs * steps_per_epoch))
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=params.label_smoothing)
    aug = augmentation(x_train.shape[-1]) if params.augment else None
    has_val = x_val is not None and y_val is not None and len(y_val) > 0

    def forward(x: Tensor) -> Tensor:
        x = resize_to(x.to(device, non_blocking=True), input_size)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return head(backbone.features(x)).float()

    def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if aug is not None:
            x = augment_batch(x, aug)
        logits = forward(x)
        return loss_fn(logits, y.to(device)), logits

    def start_epoch(epoch: int) -> dict:
        unfrozen = min(epoch, len(groups)) if params.gradual_unfreeze else len(groups)
        _set_unfrozen(groups, unfrozen)
        backbone.train()
        head.train()
        if not params.bn_train:
            for m in backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return {"unfrozen_groups": unfrozen}

    def validate() -> float | None:
        return accuracy(predict(forward, x_val, batch_size=64, desc="full val"), y_val)

    if checkpoint is not None:
        remove_stale_saves(checkpoint)
        if not params.resume:
            checkpoint.unlink(missing_ok=True)
    res = fit(
        name="full",
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
    if convert:
        backbone.to(memory_format=torch.contiguous_format)
    n_trained = sum(p.numel() for p in body) + sum(p.numel() for p in head.parameters())
    for p in backbone.parameters():
        p.requires_grad_(False)
    return FullResult(
        backbone.eval(),
        head.eval(),
        res.history,
        res.best_epoch,
        res.seconds,
        res.resumed_from,
        bf16,
        n_trained,
        res.sanity,
    )


def _fingerprint(params, root: Path) -> str:
    """Names the data and settings a checkpoint belongs to."""
    import hashlib

    from transferlab.layout import MANIFEST, SPLIT

    h = hashlib.sha256(params.section_hash("full", "features", "data").encode())
    for rel in (MANIFEST, SPLIT):
        h.update((root / rel).read_bytes())
    return h.hexdigest()


def run(params, root: Path) -> dict:
    """The ``full`` stage: fine-tune everything, one run per trial of ``full.search``, the best
    on val kept; writes ``models/full`` and ``metrics/full.json``.

    The images are decoded as for every model (the backbone's resize and crop) and resized to
    ``full.image_size`` inside the network, in training as in the stored classifier. A
    checkpoint per trial under ``.transferlab/checkpoints/`` is written every epoch; a re-run
    after a kill continues from it (``full.resume``); a finished trial's last checkpoint gives
    back its result at once. They are deleted once the model is saved.
    """
    from transferlab.atomic import write_json
    from transferlab.backbones import load_backbone
    from transferlab.classifiers.base import Classifier, save_classifier
    from transferlab.classifiers.loop import choose_trial
    from transferlab.classifiers.training import split_metrics
    from transferlab.features import split_images
    from transferlab.layout import PARTS, dataset_classes
    from transferlab.methods import METHODS

    method = METHODS["full"]
    fp = params.full
    classes = dataset_classes(root)
    fingerprint = _fingerprint(params, root)
    first = root / method.checkpoint
    imgs = None

    def checkpoint(k: int) -> Path:
        return first if k == 0 else first.with_name(f"{first.stem}.trial{k}{first.suffix}")

    def train(k: int, trial: dict) -> FullResult:
        nonlocal imgs
        backbone = load_backbone(params.features.backbone, params.features.pretrained)
        if imgs is None:
            imgs = split_images(root, classes, backbone.spec, background=params.data.background)
        return train_full(
            backbone=backbone,
            n_classes=len(classes),
            params=fp.with_trial(trial),
            x_train=imgs["x_train"],
            y_train=imgs["y_train"],
            x_val=imgs["x_val"],
            y_val=imgs["y_val"],
            checkpoint=checkpoint(k),
            fingerprint=fingerprint,
            input_size=fp.image_size,
        )

    trials = fp.trials()
    res, selection = choose_trial(
        "full", trials, train, lambda r: r.history[r.best_epoch]["val_acc"]
    )
    clf = Classifier(res.backbone, res.head, classes, method.name, fp.image_size).eval().cpu()
    preds = {p: predict(clf, imgs[f"x_{p}"], batch_size=32, desc=f"full {p} set") for p in PARTS}
    metrics = split_metrics(preds, {p: imgs[f"y_{p}"].numpy() for p in PARTS}, classes)
    metrics.update(
        {
            "history": res.history,
            "best_epoch": res.best_epoch,
            "epochs_run": len(res.history),
            "selection": selection,
            "resumed_from_epoch": res.resumed_from,
            "train_seconds": round(sum(h["seconds"] for h in res.history), 4),
            "trained_parameters": res.trained_parameters,
            "n_train": int(len(imgs["y_train"])),
            "image_size": clf.input_size,
            "bf16": res.bf16,
            "sanity": res.sanity,
        }
    )
    save_classifier(clf, root / method.model_dir, pretrained=params.features.pretrained)
    write_json(root / method.metrics_file, metrics)
    for k in range(len(trials)):
        checkpoint(k).unlink(missing_ok=True)
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | None) and k != "bf16"}
