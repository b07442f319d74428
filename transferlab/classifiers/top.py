"""A new top layer on the frozen backbone.

The backbone never trains: its weights keep ``requires_grad=False`` and it stays in eval mode, so
BatchNorm uses (and never updates) its ImageNet statistics. Without augmentation every epoch
sees the same features, so the head trains on the cached features (``features/features.npz``)
and gets the same result as training through the backbone, orders of magnitude faster. With
augmentation each batch goes through the backbone.

Training runs in the shared loop (``classifiers/loop.py``); this module supplies the step.
Progress: an epoch bar with the train loss and accuracy and the val accuracy; through the
backbone, also a batch bar in img/s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from transferlab.backbones import Backbone
from transferlab.classifiers.loop import choose_trial, epoch_budget, fit
from transferlab.classifiers.prep import wrap
from transferlab.classifiers.training import (
    accuracy,
    augment_batch,
    augmentation,
    make_head,
    make_optimizer,
    predict,
)
from transferlab.methods import TopParams

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """A trained head and how it got there.

    Attributes:
        head: the best head (by val accuracy; the last one without a val set), eval mode.
        history: per epoch: epoch, lr_head, train_loss, train_acc, val_acc (None without val),
            seconds.
        best_epoch: index into history of the kept weights.
        seconds: wall time of the training loop.
        sanity: the loop's under-trained check (``{"under_trained": bool, "why": str}``).
    """

    head: nn.Module
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    sanity: dict = field(default_factory=dict)


def train_top(
    *,
    n_classes: int,
    params: TopParams,
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor | None = None,
    y_val: Tensor | None = None,
    backbone: Backbone | None = None,
    prep: nn.Module | None = None,
) -> TrainResult:
    """Train a head with early stopping on validation accuracy (the shared loop, ``loop.fit``).

    Args:
        n_classes: number of logits.
        params: the ``top`` section.
        x_train: without ``backbone``: (N, D) features; with it: (N, 3, S, S) images in [0, 1].
        y_train: (N,) int64 labels.
        x_val, y_val: the same for validation (optional; no early stopping without them).
        backbone: pass it to train through the frozen backbone (needed for augmentation).
        prep: a fitted ``prep.FeaturePrep`` between features and head; the returned head
            includes it, so it still maps raw features.

    Returns:
        The best head and the per-epoch history.
    """
    if params.augment and backbone is None:
        raise ValueError("augmentation needs images: pass the backbone and images, not features")
    torch.manual_seed(params.seed)
    through_backbone = backbone is not None
    if through_backbone:
        backbone.eval()  # BatchNorm keeps its ImageNet statistics
        for p in backbone.parameters():
            p.requires_grad_(False)
        in_dim = backbone.feature_dim
        aug = augmentation(x_train.shape[-1]) if params.augment else None
    else:
        in_dim = x_train.shape[1]
        aug = None
    head = make_head(params.head, in_dim, n_classes, hidden=params.hidden, dropout=params.dropout)
    opt = make_optimizer(
        params.optimizer,
        [{"params": head.parameters(), "name": "head"}],
        lr=params.lr,
        momentum=params.momentum,
        weight_decay=params.weight_decay,
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=params.label_smoothing)

    @torch.no_grad()
    def feats(x: Tensor, train: bool) -> Tensor:
        if through_backbone:
            if train and aug is not None:
                x = augment_batch(x, aug)
            x = backbone.features(x)
        return x if prep is None else prep(x)

    def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = head(feats(x, True))
        return loss_fn(logits, y), logits

    has_val = x_val is not None and y_val is not None and len(y_val) > 0
    val_feats = feats(x_val, False) if has_val and not params.augment else None

    def validate() -> float | None:
        vf = val_feats if val_feats is not None else feats(x_val, False)
        return accuracy(predict(head, vf), y_val)

    res = fit(
        name="top",
        modules={"head": head},
        optimizer=opt,
        step=step,
        x_train=x_train,
        y_train=y_train,
        epochs=epoch_budget(
            epochs=params.epochs,
            min_steps=params.min_steps,
            n_train=len(y_train),
            batch_size=params.batch_size,
        ),
        batch_size=params.batch_size,
        patience=params.patience,
        seed=params.seed,
        n_classes=n_classes,
        validate=validate if has_val else None,
        # on cached features an epoch takes milliseconds: a batch bar only through the backbone
        batch_bar=through_backbone,
    )
    if prep is not None:
        head = wrap(prep, head)
    return TrainResult(head.eval(), res.history, res.best_epoch, res.seconds, res.sanity)


def run(params, root: Path) -> dict:
    """The ``top`` stage: the features under ``features.preprocess``, one head per trial of
    ``top.search`` (on the cached features, or through the backbone with ``top.augment``), the
    best on val kept; writes ``models/top`` and ``metrics/top.json``."""
    from transferlab.atomic import write_json
    from transferlab.backbones import load_backbone
    from transferlab.classifiers.base import Classifier, save_classifier
    from transferlab.classifiers.prep import choose_prep, fit_prep
    from transferlab.classifiers.training import split_metrics, trained_parameters
    from transferlab.features import split_images
    from transferlab.layout import PARTS, labelled_features
    from transferlab.methods import METHODS

    method = METHODS["top"]
    tp = params.top
    data, classes = labelled_features(root)
    kind, probe = choose_prep(
        params.features.preprocess, *(data[k] for k in ("x_train", "y_train", "x_val", "y_val"))
    )
    prep = fit_prep(kind, data["x_train"]).float()
    feats = {k: torch.from_numpy(v) for k, v in data.items()}
    backbone = load_backbone(params.features.backbone, params.features.pretrained)
    if tp.augment:
        imgs = split_images(
            root, classes, backbone.spec, background=params.data.background, parts=("train", "val")
        )
    inputs = imgs if tp.augment else {k: v.float() if k[0] == "x" else v for k, v in feats.items()}

    def train(_: int, trial: dict) -> TrainResult:
        return train_top(
            n_classes=len(classes),
            params=tp.with_trial(trial),
            x_train=inputs["x_train"],
            y_train=inputs["y_train"],
            x_val=inputs["x_val"],
            y_val=inputs["y_val"],
            backbone=backbone if tp.augment else None,
            prep=prep,
        )

    res, selection = choose_trial(
        "top", tp.trials(), train, lambda r: r.history[r.best_epoch]["val_acc"]
    )
    # the backbone is frozen, so its cached features are exactly what the classifier sees
    preds = {p: predict(res.head, feats[f"x_{p}"].float()) for p in PARTS}
    metrics = split_metrics(preds, {p: data[f"y_{p}"] for p in PARTS}, classes)
    metrics.update(
        {
            "history": res.history,
            "best_epoch": res.best_epoch,
            "epochs_run": len(res.history),
            "selection": selection,
            "preprocess": {
                "key": params.features.preprocess,
                "chosen": kind,
                "probe_val_acc": probe,
            },
            "train_seconds": round(res.seconds, 4),
            "trained_parameters": trained_parameters([res.head]),
            "n_train": int(len(data["y_train"])),
            "trained_on": "images" if tp.augment else "cached_features",
            "sanity": res.sanity,
        }
    )
    save_classifier(
        Classifier(backbone, res.head, classes, method.name),
        root / method.model_dir,
        pretrained=params.features.pretrained,
    )
    write_json(root / method.metrics_file, metrics)
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | None)}
