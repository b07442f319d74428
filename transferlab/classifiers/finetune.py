"""Fine-tuning a backbone and a head together, and the stage that runs its trials: what ``full``
and ``adv`` (and any later backbone-training method) share.

:func:`finetune` sets a run up the one way (the device, bf16, the memory layout, which
parameters train, the optimiser's two learning rates, the step budget, warmup then cosine
decay, augmentation, the checkpoint's fingerprint) and hands it to the shared loop
(``loop.fit``). A method supplies its step (plain or adversarial cross-entropy), and, if it
needs them, its validation score and an epoch hook (gradual unfreezing, an eps ramp).

:func:`run_trials` is such a method's stage body: one fine-tuning per trial of its ``search``
(each checkpointed, so a killed run resumes), the best on val kept, evaluated on every split,
saved as a ``Classifier`` with its metrics.
"""

from __future__ import annotations

import hashlib
import json
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


@dataclass
class FinetuneResult:
    """The fine-tuned backbone (updated in place) and head, at the best epoch, in eval mode.

    Attributes:
        history: per epoch: epoch, lr_backbone (when the backbone trains), lr_head,
            train_loss, train_acc, val_acc, seconds, and the method's epoch-hook fields.
        resumed_from: the epoch a checkpoint brought us past (-1: fresh start).
        bf16: whether autocast ran in bf16.
        trained_parameters: the trained backbone's (without its unused ImageNet head) and the
            head's.
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


class Network(nn.Module):
    """Backbone + head as the training runs them (what a step, a validation and an attack
    call): (B, 3, S, S) images in [0, 1] on any device -> (B, classes) float32 logits, the
    batch resized to ``input_size``, in channels_last when asked, under bf16 autocast when on."""

    def __init__(
        self,
        backbone: Backbone,
        head: nn.Module,
        *,
        device: torch.device,
        bf16: bool,
        channels_last: bool,
        input_size: int | None,
        train_body: bool,
        bn_train: bool,
    ):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.device, self.bf16, self.channels_last = device, bf16, channels_last
        self.input_size, self.train_body, self.bn_train = input_size, train_body, bn_train

    def forward(self, x: Tensor) -> Tensor:
        x = resize_to(x.to(self.device, non_blocking=True), self.input_size)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.head(self.backbone.features(x)).float()

    def train_modes(self) -> None:
        """The head trains; a trained backbone too, with its BatchNorm statistics kept unless
        ``bn_train`` (small batches make them noisy); a frozen backbone stays in eval."""
        self.head.train()
        self.backbone.train(self.train_body)
        if self.train_body and not self.bn_train:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()


def warmup_cosine(total: int, warmup: int) -> Callable[[int], float]:
    """The learning-rate factor after ``step`` optimiser steps: linear warmup over ``warmup``
    steps, then cosine decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))

    return factor


# Keys that say how a run goes, not what it learns: left out of a checkpoint's identity, so a
# run killed with other values (another number of processes) resumes from it
RUN_ONLY = {"resume", "distributed"}

# (network, x, y) batch (augmented, on the CPU) -> (loss to minimise, logits)
FinetuneStep = Callable[[Network, Tensor, Tensor], tuple[Tensor, Tensor]]


def finetune(
    *,
    name: str,
    backbone: Backbone,
    n_classes: int,
    params: FullParams,
    step: FinetuneStep,
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor | None = None,
    y_val: Tensor | None = None,
    head: nn.Module | None = None,
    validate: Callable[[Network, Tensor, Tensor], float | None] | None = None,
    on_epoch_start: Callable[[int], dict] | None = None,
    train_body: bool = True,
    channels_last: bool = False,
    checkpoint: Path | None = None,
    fingerprint: str = "",
    on_epoch_end: Callable[[dict], None] | None = None,
    device: torch.device | str | None = None,
    input_size: int | None = None,
) -> FinetuneResult:
    """Fine-tune ``backbone`` (or only ``head``) with the method's ``step``, in the shared loop.

    Args:
        name: the method, for bars, logs and the checkpoint's messages.
        backbone: an ImageNet backbone; its weights are updated in place.
        n_classes: number of logits.
        params: the method's section (``FullParams`` or a subclass).
        step: ``(network, x, y) -> (loss, logits)`` on one batch, already augmented when
            ``params.augment``: (B, 3, S, S) images in [0, 1] and (B,) int64 labels, on the CPU.
        x_train: (N, 3, S, S) images in [0, 1]. y_train: (N,) int64 labels.
        x_val, y_val: validation images and labels (optional: no early stopping without).
        head: the head to train (None: a new one as ``params`` says, drawn after seeding).
        validate: ``(network, x_val, y_val) -> score``, what picks the kept epoch (None: the
            clean val accuracy).
        on_epoch_start: ``epoch -> extra history fields``, after the train modes are set.
        train_body: train the backbone's body too (False: the head only, on a frozen body).
        channels_last: run in channels_last where the device gains from it; a backbone not in
            that layout is converted for the training and handed back in its own.
        checkpoint: file written atomically after every epoch; with ``params.resume`` an
            existing one whose ``fingerprint`` matches is continued from.
        fingerprint: names the data and settings, so a stale checkpoint is never resumed.
        on_epoch_end: called with each epoch's history row after its checkpoint is written.
        device: defaults to CUDA when available.
        input_size: resize every batch (after augmentation) to this side first, as the stored
            ``Classifier`` does in its forward (None: as given).

    Returns:
        The best backbone + head (by ``validate``; the last epoch without val), in eval mode,
        every backbone parameter frozen again.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = use_bf16(params.precision, device)
    channels_last = channels_last and use_channels_last(device)
    # load_backbone's backbones are in channels_last already
    convert = channels_last and not in_channels_last(backbone)
    torch.manual_seed(params.seed)
    if head is None:
        head = make_head(
            params.head,
            backbone.feature_dim,
            n_classes,
            hidden=params.hidden,
            dropout=params.dropout,
        )
    backbone.to(device)
    if convert:
        backbone.to(memory_format=torch.channels_last)
    head.to(device)
    # the body (or not) and the head train; the backbone's own ImageNet classifier is never used
    body = list(backbone.body.parameters())
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
        opt, warmup_cosine(epochs * per_epoch, round(params.warmup_epochs * per_epoch))
    )
    aug = augmentation(x_train.shape[-1]) if params.augment else None
    net = Network(
        backbone,
        head,
        device=device,
        bf16=bf16,
        channels_last=channels_last,
        input_size=input_size,
        train_body=train_body,
        bn_train=params.bn_train,
    )

    def batch_step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return step(net, x, y)  # augmented by the loop, each image with its own seed

    def start_epoch(epoch: int) -> dict:
        net.train_modes()
        return {} if on_epoch_start is None else on_epoch_start(epoch)

    def val_score() -> float | None:
        if validate is not None:
            return validate(net, x_val, y_val)
        return accuracy(predict(net, x_val, batch_size=64, desc=f"{name} val"), y_val)

    has_val = x_val is not None and y_val is not None and len(y_val) > 0
    if checkpoint is not None:
        remove_stale_saves(checkpoint)
        if not params.resume:
            checkpoint.unlink(missing_ok=True)
    res = fit(
        name=name,
        modules={"backbone": backbone, "head": head},
        optimizer=opt,
        scheduler=sched,
        step=batch_step,
        x_train=x_train,
        y_train=y_train,
        epochs=epochs,
        batch_size=params.batch_size,
        patience=params.patience,
        seed=params.seed,
        n_classes=n_classes,
        validate=val_score if has_val else None,
        grad_clip=params.grad_clip,
        on_epoch_start=start_epoch,
        on_epoch_end=on_epoch_end,
        checkpoint=checkpoint,
        config={**params.model_dump(mode="json", exclude=RUN_ONLY), "fingerprint": fingerprint},
        device=device,
        augment=aug,
    )
    if convert:
        backbone.to(memory_format=torch.contiguous_format)
    trained = sum(p.numel() for g in groups for p in g["params"])
    for p in backbone.parameters():
        p.requires_grad_(False)
    return FinetuneResult(
        backbone.eval(),
        head.eval(),
        res.history,
        res.best_epoch,
        res.seconds,
        res.resumed_from,
        bf16,
        trained,
        res.sanity,
    )


# a method's fine-tuning: train_full's keyword arguments -> its result
Train = Callable[..., FinetuneResult]


def run_trials(
    params,
    root: Path,
    name: str,
    *,
    train: Train,
    start: Callable[[list[str]], tuple[Backbone, nn.Module | None]],
    fingerprint_files: tuple[str, ...] = (),
    extra_metrics: Callable[[FinetuneResult], dict] = lambda res: {},
) -> dict:
    """A fine-tuning method's stage: one ``train`` per trial of its section's ``search``, the
    best on val kept; writes its ``models/<name>`` and ``metrics/<name>.json``.

    The images are decoded as for every model (the backbone's resize and crop) and resized to
    the section's ``image_size`` inside the network, in training as in the stored classifier.
    A checkpoint per trial under ``.transferlab/checkpoints/`` is written every epoch; a re-run
    after a kill continues from it (the section's ``resume``); a finished trial's last
    checkpoint gives back its result at once. They are deleted once the model is saved.

    With the section's ``distributed.processes`` > 1 this re-launches itself as that many
    torchrun ranks (``classifiers/distributed.py``): they share the decoded images, train
    data-parallel, and rank 0 evaluates and writes; the summary is rank 0's.

    Args:
        name: the method (its ``METHODS`` entry and its ``params`` section).
        train: ``train_full``'s keyword arguments (backbone, head, n_classes, params, the
            splits, checkpoint, fingerprint, input_size) -> the fine-tuned result.
        start: the dataset's classes -> a fresh starting backbone and head (None: a new head).
        fingerprint_files: workspace files besides the manifest and split whose bytes the
            checkpoints belong to (a starting model's ``meta.json``).
        extra_metrics: the method's own metrics of the kept result.

    Returns:
        The numeric metrics (the stage's summary).
    """
    from transferlab.atomic import write_json
    from transferlab.classifiers import distributed
    from transferlab.classifiers.base import Classifier, save_classifier
    from transferlab.classifiers.loop import choose_trial
    from transferlab.classifiers.training import split_metrics
    from transferlab.features import split_images
    from transferlab.layout import MANIFEST, PARTS, SPLIT, dataset_classes
    from transferlab.methods import METHODS

    method, section = METHODS[name], getattr(params, name)
    if distributed.should_launch(section.distributed.processes):
        return distributed.launch(
            name,
            params,
            root,
            processes=section.distributed.processes,
            backend=section.distributed.backend,
        )
    classes = dataset_classes(root)
    h = hashlib.sha256(params.section_hash("features", "data").encode())
    h.update(json.dumps(section.model_dump(mode="json", exclude=RUN_ONLY), sort_keys=True).encode())
    for rel in (MANIFEST, SPLIT, *fingerprint_files):
        h.update((root / rel).read_bytes())
    first = root / method.checkpoint
    imgs = None

    def checkpoint(k: int) -> Path:
        return first if k == 0 else first.with_name(f"{first.stem}.trial{k}{first.suffix}")

    def train_trial(k: int, trial: dict) -> FinetuneResult:
        nonlocal imgs
        backbone, head = start(classes)
        if imgs is None:
            imgs = distributed.computed_once(
                root / distributed.WORK_DIR / f"{name}-images.pt",
                lambda: split_images(
                    root, classes, backbone.spec, background=params.data.background
                ),
            )
        return train(
            backbone=backbone,
            head=head,
            n_classes=len(classes),
            params=section.with_trial(trial),
            x_train=imgs["x_train"],
            y_train=imgs["y_train"],
            x_val=imgs["x_val"],
            y_val=imgs["y_val"],
            checkpoint=checkpoint(k),
            fingerprint=h.hexdigest(),
            input_size=section.image_size,
        )

    trials = section.trials()
    res, selection = choose_trial(
        name, trials, train_trial, lambda r: r.history[r.best_epoch]["val_acc"]
    )
    if not distributed.is_main():
        return {}  # rank 0 evaluates and writes; the launcher returns its summary
    clf = Classifier(res.backbone, res.head, classes, method.name, section.image_size)
    clf = clf.eval().cpu()
    preds = {p: predict(clf, imgs[f"x_{p}"], batch_size=32, desc=f"{name} {p} set") for p in PARTS}
    metrics = split_metrics(preds, {p: imgs[f"y_{p}"].numpy() for p in PARTS}, classes)
    metrics.update(
        {
            "history": res.history,
            "best_epoch": res.best_epoch,
            "epochs_run": len(res.history),
            "selection": selection,
            "resumed_from_epoch": res.resumed_from,
            "train_seconds": round(sum(h["seconds"] for h in res.history), 4),
            **extra_metrics(res),
            "n_train": int(len(imgs["y_train"])),
            "image_size": clf.input_size,
            "sanity": res.sanity,
        }
    )
    save_classifier(clf, root / method.model_dir, pretrained=params.features.pretrained)
    write_json(root / method.metrics_file, metrics)
    for k in range(len(trials)):
        checkpoint(k).unlink(missing_ok=True)
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | None) and k != "bf16"}
