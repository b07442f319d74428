"""Full fine-tuning: backbone and head train together.

The seed's recipe: a smaller learning rate for the convolutional filters than for the new top
layer (``backbone lr = lr * backbone_lr_ratio``), SGD with momentum, augmentation, and watching
whether training accuracy hits 100% while validation lags (overfitting). On top: linear warmup
then cosine decay, gradient clipping, optional gradual unfreezing (top groups first), bf16
autocast where the hardware has it, early stopping, and an atomic checkpoint every epoch so a
killed run resumes where it stopped.

Progress: an epoch bar (train loss and accuracy, val accuracy) over a batch bar (img/s and the
running train loss and accuracy); the kept epoch's figures are logged at INFO, each epoch's at
DEBUG.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from transferlab import tensor_files
from transferlab.backbones import Backbone
from transferlab.classifiers.training import (
    accuracy,
    atomic_torch_save,
    augment_batch,
    augmentation,
    in_channels_last,
    make_head,
    make_optimizer,
    predict,
    use_bf16,
    use_channels_last,
)
from transferlab.methods import FullParams
from transferlab.progress import Throttle, progress, show_fit

log = logging.getLogger(__name__)

# train accuracy this high while val trails by more than this: warn about overfitting
OVERFIT_GAP = 0.1


@dataclass
class FullResult:
    """The fine-tuned backbone (updated in place) and head, at the best epoch.

    Attributes:
        history: per epoch: epoch, lr_head, lr_backbone, train_loss, train_acc, val_acc,
            unfrozen_groups, seconds.
        resumed_from: the epoch a checkpoint brought us past (-1: fresh start).
        bf16: whether autocast ran in bf16.
    """

    backbone: Backbone
    head: nn.Module
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    resumed_from: int = -1
    bf16: bool = False
    trained_parameters: int = 0


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


def _snapshot(module: nn.Module) -> OrderedDict:
    """A copy of ``module.state_dict()`` (what ``copy.deepcopy`` gave, at a fraction of its
    per-tensor cost): cloned tensors, and the version metadata ``load_state_dict`` reads."""
    state = module.state_dict()
    out = OrderedDict((k, v.clone()) for k, v in state.items())
    out._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]
    return out


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
) -> FullResult:
    """Fine-tune ``backbone`` and a new head.

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
    for p in backbone.parameters():
        p.requires_grad_(True)
    groups = _groups(backbone, params.unfreeze_groups)
    backbone_params = [p for p in backbone.parameters()]
    opt = make_optimizer(
        params.optimizer,
        [
            {"params": backbone_params, "lr": params.lr * params.backbone_lr_ratio},
            {"params": list(head.parameters()), "lr": params.lr},
        ],
        lr=params.lr,
        momentum=params.momentum,
        weight_decay=params.weight_decay,
    )
    steps_per_epoch = math.ceil(len(y_train) / params.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        _schedule(params.epochs * steps_per_epoch, round(params.warmup_epochs * steps_per_epoch)),
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=params.label_smoothing)
    aug = augmentation(x_train.shape[-1]) if params.augment else None
    order = torch.Generator().manual_seed(params.seed)
    has_val = x_val is not None and y_val is not None and len(y_val) > 0

    def forward(x: Tensor) -> Tensor:
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return head(backbone.features(x)).float()

    history: list[dict] = []
    best = {"acc": -1.0, "epoch": 0, "backbone": None, "head": None}
    stale, start_epoch, resumed_from, stopped = 0, 0, -1, False
    config = {**params.model_dump(mode="json"), "resume": None, "fingerprint": fingerprint}
    if checkpoint is not None and params.resume and checkpoint.exists():
        try:
            state = tensor_files.load(checkpoint, map_location=device)
        except tensor_files.CorruptFileError as exc:  # a cache of progress: start afresh
            log.warning("full: %s; starting afresh", exc)
            state = {"config": None}
        if state["config"] == config:
            backbone.load_state_dict(state["backbone"])
            head.load_state_dict(state["head"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            torch.set_rng_state(state["rng"])
            order.set_state(state["order_rng"])
            history, best, stale = state["history"], state["best"], state["stale"]
            stopped = state["stopped"]
            start_epoch = resumed_from = state["epoch"] + 1
            log.info("full: resuming from %s after epoch %d", checkpoint, state["epoch"])
        else:
            log.warning("full: %s is from other data or settings; starting afresh", checkpoint)

    start = time.perf_counter()
    # updated by hand, so the count and the epoch's figures show together (resumed: from there)
    bar = progress(desc="full", unit="epoch", total=params.epochs, initial=start_epoch)
    for epoch in range(start_epoch, params.epochs):
        if stopped:
            break
        t0 = time.perf_counter()
        unfrozen = min(epoch, len(groups)) if params.gradual_unfreeze else len(groups)
        _set_unfrozen(groups, unfrozen)
        backbone.train()
        head.train()
        if not params.bn_train:
            for m in backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        perm = torch.randperm(len(y_train), generator=order)
        # summed on the device: reading them back every batch would stall a GPU's queue
        # (float64 as the Python float sum was; Apple's MPS has no float64)
        sum_dtype = torch.float32 if device.type == "mps" else torch.float64
        loss_sum = torch.zeros((), dtype=sum_dtype, device=device)
        n_correct = torch.zeros((), dtype=torch.int64, device=device)
        batches = progress(
            desc=f"full epoch {epoch + 1}/{params.epochs}", unit="img", total=len(y_train)
        )
        show = Throttle(batches)
        with batches:
            for i in range(0, len(perm), params.batch_size):
                idx = perm[i : i + params.batch_size]
                x = x_train[idx]
                if aug is not None:
                    x = augment_batch(x, aug)
                y = y_train[idx].to(device)
                logits = forward(x)
                loss = loss_fn(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if params.grad_clip is not None:
                    nn.utils.clip_grad_norm_(
                        [p for g in opt.param_groups for p in g["params"] if p.grad is not None],
                        params.grad_clip,
                    )
                opt.step()
                sched.step()
                loss_sum += loss.detach().to(sum_dtype) * len(idx)
                n_correct += (logits.argmax(1) == y).sum()
                if show():  # training accuracy is the recipe's overfitting signal: show it
                    seen = i + len(idx)
                    show_fit(batches, float(loss_sum) / seen, int(n_correct) / seen)
                batches.update(len(idx))
        backbone.eval()
        head.eval()
        total_loss, correct = float(loss_sum), int(n_correct)
        train_acc = correct / len(y_train)
        val_acc = (
            accuracy(predict(forward, x_val, batch_size=64, desc="full val"), y_val)
            if has_val
            else None
        )
        row = {
            "epoch": epoch,
            "lr_backbone": opt.param_groups[0]["lr"],
            "lr_head": opt.param_groups[1]["lr"],
            "train_loss": total_loss / len(y_train),
            "train_acc": train_acc,
            "val_acc": val_acc,
            "unfrozen_groups": unfrozen,
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        show_fit(bar, row["train_loss"], train_acc, val_acc)
        bar.update()
        log.debug(
            "full epoch %d/%d: train loss %.4f, train acc %.3f, val acc %s (%.1f s)",
            epoch + 1,
            params.epochs,
            row["train_loss"],
            train_acc,
            "-" if val_acc is None else f"{val_acc:.3f}",
            row["seconds"],
        )
        if has_val and train_acc >= 1.0 and val_acc < train_acc - OVERFIT_GAP:
            log.warning(
                "full: training accuracy reached 100%% at epoch %d while validation is %.3f: "
                "overfitting; consider more augmentation, weight decay or fewer epochs",
                epoch,
                val_acc,
            )
        if not has_val or val_acc > best["acc"]:
            # without val the last epoch is kept: its weights are the live ones, no copy needed
            best = {
                "acc": val_acc if has_val else -1.0,
                "epoch": epoch,
                "backbone": _snapshot(backbone) if has_val else None,
                "head": _snapshot(head) if has_val else None,
            }
            stale = 0
        else:
            stale += 1
            if stale >= params.patience:
                log.info("full: early stop at epoch %d (best %d)", epoch, best["epoch"])
                stopped = True
        if checkpoint is not None:
            atomic_torch_save(
                {
                    "config": config,
                    "epoch": epoch,
                    "backbone": backbone.state_dict(),
                    "head": head.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "rng": torch.get_rng_state(),
                    "order_rng": order.get_state(),
                    "history": history,
                    "best": best,
                    "stale": stale,
                    "stopped": stopped,
                },
                checkpoint,
            )
        if on_epoch_end is not None:
            on_epoch_end(row)
    bar.close()
    if history:
        kept = history[best["epoch"] - history[0]["epoch"]]
        log.info(
            "full: %d epochs in %.1f s, kept epoch %d: train loss %.4f, train acc %.3f, val acc %s",
            len(history),
            sum(h["seconds"] for h in history),
            best["epoch"] + 1,
            kept["train_loss"],
            kept["train_acc"],
            "-" if kept["val_acc"] is None else f"{kept['val_acc']:.3f}",
        )
    if best["backbone"] is not None:
        backbone.load_state_dict(best["backbone"])
        head.load_state_dict(best["head"])
    if convert:
        backbone.to(memory_format=torch.contiguous_format)
    n_trained = sum(p.numel() for p in backbone.parameters()) + sum(
        p.numel() for p in head.parameters()
    )
    for p in backbone.parameters():
        p.requires_grad_(False)
    return FullResult(
        backbone.eval(),
        head.eval(),
        history,
        best["epoch"],
        time.perf_counter() - start,
        resumed_from,
        bf16,
        n_trained,
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
    """The ``full`` stage: fine-tune everything; write ``models/full`` and ``metrics/full.json``.

    A checkpoint under ``.transferlab/checkpoints/`` is written every epoch; a re-run after a
    kill continues from it (``full.resume``) and deletes it once the model is saved.
    """
    from transferlab.atomic import write_json
    from transferlab.backbones import load_backbone
    from transferlab.classifiers.base import Classifier, save_classifier
    from transferlab.classifiers.training import spec_at_size, split_metrics
    from transferlab.features import split_images
    from transferlab.layout import PARTS, dataset_classes
    from transferlab.methods import METHODS

    method = METHODS["full"]
    fp = params.full
    classes = dataset_classes(root)
    backbone = load_backbone(params.features.backbone, params.features.pretrained)
    backbone.spec = spec_at_size(backbone.spec, fp.image_size)
    imgs = split_images(root, classes, backbone.spec, background=params.data.background)
    ckpt = root / method.checkpoint
    # A SIGKILL during a checkpoint save leaves its temp file (the size of the model and the
    # optimizer state); the workspace lock makes this run the only writer, so it is stale.
    for tmp in ckpt.parent.glob(f".{ckpt.name}.*.tmp"):
        log.info("full: removing %s, left by an interrupted checkpoint save", tmp)
        tmp.unlink(missing_ok=True)
    res = train_full(
        backbone=backbone,
        n_classes=len(classes),
        params=fp,
        x_train=imgs["x_train"],
        y_train=imgs["y_train"],
        x_val=imgs["x_val"],
        y_val=imgs["y_val"],
        checkpoint=ckpt,
        fingerprint=_fingerprint(params, root),
    )
    clf = Classifier(res.backbone, res.head, classes, method.name).eval().cpu()
    preds = {p: predict(clf, imgs[f"x_{p}"], batch_size=32, desc=f"full {p} set") for p in PARTS}
    metrics = split_metrics(preds, {p: imgs[f"y_{p}"].numpy() for p in PARTS}, classes)
    metrics.update(
        {
            "history": res.history,
            "best_epoch": res.best_epoch,
            "epochs_run": len(res.history),
            "resumed_from_epoch": res.resumed_from,
            "train_seconds": round(sum(h["seconds"] for h in res.history), 4),
            "trained_parameters": res.trained_parameters,
            "n_train": int(len(imgs["y_train"])),
            "image_size": backbone.spec.input_size,
            "bf16": res.bf16,
        }
    )
    save_classifier(clf, root / method.model_dir, pretrained=params.features.pretrained)
    write_json(root / method.metrics_file, metrics)
    ckpt.unlink(missing_ok=True)
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | None) and k != "bf16"}
