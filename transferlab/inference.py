"""Batched inference without gradients, and accuracy: the one copy every stage and attack uses."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from transferlab.progress import progress


def logits(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    batch_size: int = 32,
    desc: str | None = None,
) -> Tensor:
    """``fn`` over ``x`` in batches under ``torch.inference_mode``.

    Args:
        fn: (B, ...) -> (B, K) scores: a classifier on images in [0, 1], or a head on features.
        x: (N, ...) inputs.
        desc: show an img/s progress bar with this label (for passes through a backbone).

    Returns:
        (N, K) float32 scores (bf16 autocast outputs are widened).
    """
    if len(x) == 0:
        return torch.zeros(0, 0)
    out = []
    with (
        torch.inference_mode(),
        progress(desc=desc or "", unit="img", total=len(x), disable=desc is None) as bar,
    ):
        for i in range(0, len(x), batch_size):
            out.append(fn(x[i : i + batch_size]).float())
            bar.update(len(out[-1]))
    return torch.cat(out)


def predict(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    batch_size: int = 32,
    desc: str | None = None,
) -> Tensor:
    """(N,) int64 argmax of ``fn`` over ``x``, batched like ``logits`` (which see)."""
    if len(x) == 0:
        return torch.zeros(0, dtype=torch.long)
    out = []
    with (
        torch.inference_mode(),
        progress(desc=desc or "", unit="img", total=len(x), disable=desc is None) as bar,
    ):
        for i in range(0, len(x), batch_size):
            out.append(fn(x[i : i + batch_size]).argmax(1))
            bar.update(len(out[-1]))
    return torch.cat(out).cpu()


def accuracy(pred: np.ndarray | Tensor, y: np.ndarray | Tensor) -> float | None:
    """Fraction of ``pred == y`` (both (N,) class indices); None for no images."""
    pred = pred.cpu().numpy() if isinstance(pred, Tensor) else np.asarray(pred)
    y = y.cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
    return float((pred == y).mean()) if len(y) else None
