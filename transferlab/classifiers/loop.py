"""The one training loop of every gradient-trained method (``top``, ``full``, and any later one).

The loop owns the epochs, the batch order, the optimiser step (clipping, schedule), the
validation pass, the best state, early stopping, the per-epoch checkpoint and its resume, the
history, the bars and the under-trained check. A method owns its step: a hook that maps a batch
to ``(loss, logits)`` (the plain cross-entropy, or an adversarial one), and, if it needs one, a
hook that runs at the start of each epoch (train modes, gradual unfreezing).

Same seed, same data, same settings: the same weights, whether the run was killed and resumed
in between or not (the checkpoint holds the weights, the optimiser and schedule, and every
random state the loop draws from), and whether it ran in one process or data-parallel in
several (``classifiers/distributed.py``): all randomness comes from one generator that every rank
holds alike. It draws each epoch's batch order, a seed per image for the augmentation (the loop
augments, image by image, so an image gets the same crop on whichever rank trains it), and a
seed per batch for the step's own draws (dropout, an attack's random start; those are drawn per
rank's shard, so they alone differ between world sizes).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

from transferlab import tensor_files
from transferlab.classifiers import distributed
from transferlab.classifiers.training import atomic_torch_save, augment_batch
from transferlab.progress import Throttle, progress, show_fit

log = logging.getLogger(__name__)

# train accuracy at 1 while val trails by more than this: warn about overfitting
OVERFIT_GAP = 0.1
# under-trained: the last this many epochs still raised val accuracy, and the budget (not early
# stopping) ended the run
RISING_WINDOW = 2

T = TypeVar("T")

# (x, y) batch on the CPU -> (loss to minimise, logits for the running accuracy)
StepFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
# seeds drawn for a step's randomness: below 2**62, so a rank's offset never overflows
SEED_RANGE = 2**62


@dataclass
class LoopResult:
    """How the training went; the modules hold the best weights afterwards.

    Attributes:
        history: one row per epoch: epoch, lr_<group>, train_loss, train_acc, val_acc (None
            without val), seconds, and whatever the epoch hook returned.
        best_epoch: the epoch whose weights were kept (the last one without val).
        resumed_from: the first epoch run after a checkpoint (-1: a fresh start).
        stopped_early: early stopping (not the budget) ended the run.
        sanity: ``{"under_trained": bool, "why": str}``; see :func:`under_trained`.
    """

    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    resumed_from: int = -1
    stopped_early: bool = False
    sanity: dict = field(default_factory=dict)


def epoch_budget(*, epochs: int, min_steps: int, n_train: int, batch_size: int) -> int:
    """Epochs to run at most: ``epochs``, or more when that many passes over a small training
    set would take fewer than ``min_steps`` optimiser steps. The step budget thus grows with the
    training set (``epochs`` passes) and never falls below ``min_steps``."""
    steps_per_epoch = max(1, math.ceil(n_train / batch_size))
    return max(epochs, math.ceil(min_steps / steps_per_epoch))


def under_trained(history: list[dict], *, n_classes: int, stopped_early: bool) -> dict:
    """The sanity check every trained method records: did training converge?

    It fires when val accuracy was still rising in the last ``RISING_WINDOW`` epochs of a run
    that the budget ended (one epoch counts as rising from chance), or when training accuracy
    stayed low: below halfway from chance (1 / classes) to 1 in every epoch.

    Returns:
        ``{"under_trained": bool, "why": str}`` (``why`` is empty when it does not fire).
    """
    chance = 1.0 / max(1, n_classes)
    reasons = []
    vals = [h["val_acc"] for h in history if h.get("val_acc") is not None]
    if vals and not stopped_early:
        before = vals[-1 - RISING_WINDOW] if len(vals) > RISING_WINDOW else chance
        if vals[-1] > before and vals[-1] >= max(vals):
            reasons.append(
                f"val accuracy still rising at the end of the budget ({before:.3f} -> "
                f"{vals[-1]:.3f} over the last {min(len(vals), RISING_WINDOW)} epochs); "
                "raise the epochs"
            )
    train = [h["train_acc"] for h in history if h.get("train_acc") is not None]
    low = chance + 0.5 * (1.0 - chance)
    if train and max(train) < low:
        reasons.append(
            f"training accuracy stayed low (best {max(train):.3f} < {low:.3f}); raise the "
            "epochs or the learning rate"
        )
    return {"under_trained": bool(reasons), "why": "; ".join(reasons)}


def snapshot(module: nn.Module) -> OrderedDict:
    """A copy of ``module.state_dict()`` (what ``copy.deepcopy`` gave, at a fraction of its
    per-tensor cost): cloned tensors, and the version metadata ``load_state_dict`` reads."""
    state = module.state_dict()
    out = OrderedDict((k, v.clone()) for k, v in state.items())
    out._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]
    return out


def remove_stale_saves(checkpoint: Path) -> None:
    """A SIGKILL during a checkpoint save leaves its temp file (the size of the model and the
    optimiser state); the workspace lock makes this run the only writer, so it is stale."""
    for tmp in checkpoint.parent.glob(f".{checkpoint.name}.*.tmp"):
        log.info("removing %s, left by an interrupted checkpoint save", tmp)
        tmp.unlink(missing_ok=True)


def fit(
    *,
    name: str,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    step: StepFn,
    x_train: Tensor,
    y_train: Tensor,
    epochs: int,
    batch_size: int,
    patience: int,
    seed: int,
    n_classes: int,
    validate: Callable[[], float | None] | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip: float | None = None,
    on_epoch_start: Callable[[int], dict] | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
    checkpoint: Path | None = None,
    config: dict | None = None,
    device: torch.device | None = None,
    batch_bar: bool = True,
    augment: Callable[[Tensor], Tensor] | None = None,
) -> LoopResult:
    """Train ``modules`` with ``step`` until the budget or early stopping ends it.

    Args:
        name: the method, for bars and logs.
        modules: everything the weights live in, by name: snapshotted as the best state,
            checkpointed, restored at the end.
        optimizer: over the trainable parameters; a param group's ``"name"`` key names its
            ``lr_<name>`` history column.
        step: the method's hook, ``(x, y) -> (loss, logits)`` on one batch: (B, ...) inputs,
            (B,) int64 labels (on the CPU; the hook moves them).
        x_train, y_train: (N, ...) inputs and (N,) labels.
        epochs: the budget (see :func:`epoch_budget`); patience: epochs without a val gain
            before stopping; seed: the batch order's.
        validate: val accuracy of the current weights (None: no val, keep the last epoch).
        on_epoch_start: sets train modes and the like before an epoch; returns extra history
            fields. Without it, every module is put in train mode.
        on_epoch_end: called with each epoch's row once its checkpoint is written.
        checkpoint: written atomically after every epoch; an existing one whose ``config``
            matches is resumed from.
        config: names the data and settings (a stale checkpoint is never resumed).
        batch_bar: show a batch bar (img/s) beside the epoch bar.
        augment: a random (C, H, W) -> (C, H, W) transform the loop applies to each training
            image before the step, with a seed per image (see the module's docstring).

    In a process group (``classifiers/distributed.py``, under torchrun) every rank calls this
    with the same arguments: each trains on its shard of every global batch of ``batch_size``,
    its loss scaled by its share, and the gradients are summed over the ranks before the
    clipping and the optimiser step, so every rank applies one process's update. Validation
    runs on rank 0 and its result is broadcast; rank 0 writes the checkpoint.

    Returns:
        The history and the outcome; the modules hold the best weights, in eval mode.
    """
    device = device or torch.device("cpu")
    order = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    best: dict = {"acc": -1.0, "epoch": 0, "state": None}
    stale, start_epoch, resumed_from, stopped = 0, 0, -1, False
    if checkpoint is not None and checkpoint.exists():
        try:
            state = tensor_files.load(checkpoint, map_location=device)
        except tensor_files.CorruptFileError as exc:  # a cache of progress: start afresh
            log.warning("%s: %s; starting afresh", name, exc)
            state = {"config": None}
        if state.get("config") == config:
            for key, module in modules.items():
                module.load_state_dict(state["modules"][key])
            optimizer.load_state_dict(state["opt"])
            if scheduler is not None:
                scheduler.load_state_dict(state["sched"])
            order.set_state(state["order_rng"])
            history, best, stale = state["history"], state["best"], state["stale"]
            stopped = state["stopped"]
            start_epoch = resumed_from = state["epoch"] + 1
            log.info("%s: resuming from %s after epoch %d", name, checkpoint, state["epoch"])
        else:
            log.warning("%s: %s is from other data or settings; starting afresh", name, checkpoint)
    # every rank has read the checkpoint before rank 0 may replace it, and all start alike
    distributed.broadcast_modules(modules.values())
    world = distributed.world_size()

    params = [p for g in optimizer.param_groups for p in g["params"]]
    # summed on the device: reading them back every batch would stall a GPU's queue
    # (float64 as a Python float sum is; Apple's MPS has no float64)
    sum_dtype = torch.float32 if device.type == "mps" else torch.float64
    start = time.perf_counter()
    # updated by hand, so the count and the epoch's figures show together (resumed: from there)
    bar = progress(desc=name, unit="epoch", total=epochs, initial=start_epoch)
    for epoch in range(start_epoch, epochs):
        if stopped:
            break
        t0 = time.perf_counter()
        if on_epoch_start is not None:
            extra = on_epoch_start(epoch)
        else:
            extra = {}
            for module in modules.values():
                module.train()
        perm = torch.randperm(len(y_train), generator=order)
        image_seeds = torch.randint(SEED_RANGE, (len(perm),), generator=order)
        step_seeds = torch.randint(
            SEED_RANGE, (math.ceil(len(perm) / batch_size),), generator=order
        )
        seen = 0
        loss_sum = torch.zeros((), dtype=sum_dtype, device=device)
        n_correct = torch.zeros((), dtype=torch.int64, device=device)
        batches = progress(
            desc=f"{name} epoch {epoch + 1}/{epochs}",
            unit="img",
            total=len(y_train),
            disable=not batch_bar,
        )
        show = Throttle(batches)
        with batches:
            for b, i in enumerate(range(0, len(perm), batch_size)):
                n_batch = min(batch_size, len(perm) - i)
                mine = distributed.shard(torch.arange(i, i + n_batch))  # positions in perm
                idx = perm[mine]
                if len(idx):
                    x, y = x_train[idx], y_train[idx]
                    if augment is not None:
                        x = augment_batch(x, augment, image_seeds[mine])
                    torch.manual_seed(int(step_seeds[b]) + distributed.rank())
                    loss, logits = step(x, y)
                    optimizer.zero_grad(set_to_none=True)
                    # this rank's share of the global batch's mean loss (x 1.0 in one process)
                    (loss * (len(idx) / n_batch)).backward()
                    loss_sum += loss.detach().to(sum_dtype) * len(idx)
                    n_correct += (logits.detach().argmax(1) == y.to(logits.device)).sum()
                    seen += len(idx)
                else:  # a batch smaller than the world: this rank contributes zeros
                    optimizer.zero_grad(set_to_none=True)
                distributed.all_reduce_grads(params, some_empty=n_batch < world)
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], grad_clip)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                if show() and seen:  # training accuracy is the recipe's overfitting signal
                    show_fit(batches, float(loss_sum) / seen, int(n_correct) / seen)
                batches.update(n_batch)
        for module in modules.values():
            module.eval()
        distributed.sum_over_ranks(loss_sum)
        distributed.sum_over_ranks(n_correct)
        train_acc = int(n_correct) / len(y_train)
        val_acc = distributed.from_main(validate) if validate is not None else None
        row = {
            "epoch": epoch,
            **{f"lr_{g.get('name', k)}": g["lr"] for k, g in enumerate(optimizer.param_groups)},
            "train_loss": float(loss_sum) / len(y_train),
            "train_acc": train_acc,
            "val_acc": val_acc,
            **extra,
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        show_fit(bar, row["train_loss"], train_acc, val_acc)
        bar.update()
        log.debug(
            "%s epoch %d/%d: train loss %.4f, train acc %.3f, val acc %s (%.1f s)",
            name,
            epoch + 1,
            epochs,
            row["train_loss"],
            train_acc,
            "-" if val_acc is None else f"{val_acc:.3f}",
            row["seconds"],
        )
        if (
            val_acc is not None
            and train_acc >= 1.0
            and val_acc < train_acc - OVERFIT_GAP
            and not any(h["train_acc"] >= 1.0 for h in history[:-1])  # once per run
        ):
            log.warning(
                "%s: training accuracy reached 100%% at epoch %d while validation is %.3f: "
                "overfitting; consider more augmentation, weight decay or fewer epochs",
                name,
                epoch,
                val_acc,
            )
        if val_acc is None or val_acc > best["acc"]:
            # without val the last epoch is kept: its weights are the live ones, no copy needed
            best = {
                "acc": -1.0 if val_acc is None else val_acc,
                "epoch": epoch,
                "state": None if val_acc is None else {k: snapshot(m) for k, m in modules.items()},
            }
            stale = 0
        else:
            stale += 1
            if stale >= patience:
                log.info(  # epochs counted from 1, as in the bars and the "kept epoch" line
                    "%s: early stop after epoch %d (best: epoch %d)",
                    name,
                    epoch + 1,
                    best["epoch"] + 1,
                )
                stopped = True
        if checkpoint is not None and distributed.is_main():
            atomic_torch_save(
                {
                    "config": config,
                    "epoch": epoch,
                    "modules": {k: m.state_dict() for k, m in modules.items()},
                    "opt": optimizer.state_dict(),
                    "sched": scheduler.state_dict() if scheduler is not None else None,
                    "order_rng": order.get_state(),
                    "history": history,
                    "best": best,
                    "stale": stale,
                    "stopped": stopped,
                },
                checkpoint,
            )
        distributed.barrier()  # the checkpoint is whole before any rank moves on
        if on_epoch_end is not None:
            on_epoch_end(row)
    bar.close()
    if history:
        kept = history[best["epoch"] - history[0]["epoch"]]
        log.info(
            "%s: %d epochs in %.1f s, kept epoch %d: train loss %.4f, train acc %.3f, val acc %s",
            name,
            len(history),
            sum(h["seconds"] for h in history),
            best["epoch"] + 1,
            kept["train_loss"],
            kept["train_acc"],
            "-" if kept["val_acc"] is None else f"{kept['val_acc']:.3f}",
        )
    if best["state"] is not None:
        for key, module in modules.items():
            module.load_state_dict(best["state"][key])
    for module in modules.values():
        module.eval()
    return LoopResult(
        history=history,
        best_epoch=best["epoch"],
        seconds=time.perf_counter() - start,
        resumed_from=resumed_from,
        stopped_early=stopped,
        sanity=under_trained(history, n_classes=n_classes, stopped_early=stopped),
    )


def choose_trial(
    name: str,
    trials: list[dict],
    train: Callable[[int, dict], T],
    val_acc: Callable[[T], float | None],
) -> tuple[T, dict]:
    """Train every hyperparameter trial and keep the best on the validation split.

    Args:
        trials: each a dict of section keys -> values (``TrainParams.trials()``).
        train: ``(index, trial) -> result``. val_acc: a result's kept val accuracy.

    Returns:
        The best result (the first of equal scores) and ``{"on", "chosen", "trials"}`` for the
        metrics. Without a validation split nothing can be chosen: only the first trial trains.
    """
    best, best_acc, table = None, -1.0, []
    for k, trial in enumerate(trials):
        if len(trials) > 1:
            log.info("%s: trial %d/%d %s", name, k + 1, len(trials), trial)
        result = train(k, trial)
        acc = val_acc(result)
        table.append({**trial, "val_acc": acc})
        if best is None or (acc is not None and acc > best_acc):
            best, best_acc, chosen = result, (-1.0 if acc is None else acc), trial
        if acc is None:
            if len(trials) > 1:
                log.warning("%s: no validation split to choose on; kept the first trial", name)
            break
    return best, {"on": "val", "chosen": chosen, "trials": table}
