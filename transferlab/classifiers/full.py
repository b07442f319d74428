"""Full fine-tuning: backbone and head train together.

The seed's recipe: a smaller learning rate for the convolutional filters than for the new top
layer (``backbone lr = lr * backbone_lr_ratio``), SGD with momentum, augmentation, and watching
whether training accuracy hits 100% while validation lags (overfitting). On top: linear warmup
then cosine decay, gradient clipping, optional gradual unfreezing (top groups first), bf16
autocast where the hardware has it, channels_last on a CPU. The shared fine-tuning
(``classifiers/finetune.py``) sets it up and the shared loop (``classifiers/loop.py``) runs it:
early stopping, an atomic checkpoint every epoch so a killed run resumes where it stopped,
history. This module supplies the plain cross-entropy step and the unfreezing.

Progress: an epoch bar (train loss and accuracy, val accuracy) over a batch bar (img/s and the
running train loss and accuracy); the kept epoch's figures are logged at INFO, each epoch's at
DEBUG.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from transferlab.backbones import Backbone
from transferlab.classifiers.finetune import FinetuneResult, Network, finetune, run_trials
from transferlab.methods import FullParams


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


def train_full(*, backbone: Backbone, params: FullParams, **kw: Any) -> FinetuneResult:
    """Fine-tune ``backbone`` and a head with the cross-entropy: ``finetune.finetune`` with
    this step and the gradual unfreezing, in channels_last where the device gains from it.

    Args:
        backbone: an ImageNet backbone; its weights are updated in place.
        params: the ``full`` section.
        kw: the rest of ``finetune``'s arguments: n_classes, x_train, y_train (and optionally
            x_val, y_val, head, checkpoint, fingerprint, on_epoch_end, device, input_size).

    Returns:
        The best backbone + head (by val accuracy; the last epoch without val), in eval mode;
        history rows add ``unfrozen_groups``.
    """
    loss_fn = nn.CrossEntropyLoss(label_smoothing=params.label_smoothing)

    def step(net: Network, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = net(x)
        return loss_fn(logits, y.to(net.device)), logits

    def start_epoch(epoch: int) -> dict:
        groups = _groups(backbone, params.unfreeze_groups)  # the parameters as moved to the device
        unfrozen = min(epoch, len(groups)) if params.gradual_unfreeze else len(groups)
        _set_unfrozen(groups, unfrozen)
        return {"unfrozen_groups": unfrozen}

    return finetune(
        name="full",
        backbone=backbone,
        params=params,
        step=step,
        on_epoch_start=start_epoch,
        channels_last=True,
        **kw,
    )


def run(params, root: Path) -> dict:
    """The ``full`` stage: fine-tune everything, one run per trial of ``full.search``, the best
    on val kept (``finetune.run_trials``); writes ``models/full`` and ``metrics/full.json``."""
    from transferlab.backbones import load_backbone

    def start(classes: list[str]) -> tuple[Backbone, None]:
        return load_backbone(params.features.backbone, params.features.pretrained), None

    return run_trials(
        params,
        root,
        "full",
        train=train_full,
        start=start,
        extra_metrics=lambda res: {"trained_parameters": res.trained_parameters, "bf16": res.bf16},
    )
