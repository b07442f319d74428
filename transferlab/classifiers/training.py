"""Pieces the trained methods (``top`` and ``full``) share: heads, optimisers, augmentation,
precision, accuracy and atomic checkpoints."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.transforms import v2 as T

from transferlab import inference
from transferlab.atomic import atomic_write
from transferlab.backbone_specs import BackboneSpec
from transferlab.inference import accuracy  # noqa: F401  (re-exported for the methods)

log = logging.getLogger(__name__)


def make_head(
    kind: str, in_features: int, n_classes: int, *, hidden: int = 256, dropout: float = 0.2
) -> nn.Module:
    """A linear head, or an MLP (Linear -> ReLU -> Dropout -> Linear).

    Args:
        kind: "linear" | "mlp".

    Returns:
        A module mapping (N, in_features) features to (N, n_classes) logits.
    """
    if kind == "linear":
        return nn.Linear(in_features, n_classes)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_classes),
        )
    raise ValueError(f"unknown head {kind!r}; allowed values are 'linear', 'mlp'")


def head_spec(head: nn.Module) -> dict:
    """What :func:`make_head` needs to rebuild ``head`` (stored in ``meta.json``); a head behind
    a feature transform (``prep.Prepped``) adds the transform's kind."""
    from transferlab.classifiers.prep import Prepped

    if isinstance(head, Prepped):
        return {**head_spec(head.head), "prep": head.prep.kind}
    if isinstance(head, nn.Linear):
        return {
            "kind": "linear",
            "in_features": head.in_features,
            "out_features": head.out_features,
        }
    if isinstance(head, nn.Sequential) and len(head) == 4:
        first, _, drop, last = head
        return {
            "kind": "mlp",
            "in_features": first.in_features,
            "out_features": last.out_features,
            "hidden": first.out_features,
            "dropout": drop.p,
        }
    raise TypeError(f"cannot store a head of type {type(head).__name__}")


def head_from_spec(spec: dict) -> nn.Module:
    from transferlab.classifiers.prep import FeaturePrep, wrap

    head = make_head(
        spec.get("kind", "linear"),
        spec["in_features"],
        spec["out_features"],
        hidden=spec.get("hidden", 256),
        dropout=spec.get("dropout", 0.0),
    )
    return wrap(FeaturePrep(spec.get("prep", "none"), spec["in_features"]), head)


def make_optimizer(
    name: str,
    groups: Iterable[dict],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> torch.optim.Optimizer:
    """SGD with momentum (the default), or RMSProp with a warning: the seed advises against it
    for fine-tuning, because its adaptive steps wreck the pretrained weights early on."""
    groups = list(groups)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "rmsprop":
        log.warning(
            "optimizer rmsprop: fine-tuning usually works better with SGD + momentum at a small "
            "learning rate (the seed's advice); RMSProp's adaptive steps can destroy the "
            "pretrained features"
        )
        return torch.optim.RMSprop(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; allowed values are 'sgd', 'rmsprop'")


def augmentation(size: int) -> T.Compose:
    """Random crop, flip and colour jitter on (3, S, S) float images in [0, 1]."""
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        ]
    )


def augment_batch(
    x01: Tensor, transform: Callable[[Tensor], Tensor], seeds: Tensor | None = None
) -> Tensor:
    """Each image of (B, C, H, W) ``x01`` through ``transform``, clamped to [0, 1]. Per image:
    a batch call would give every image the same crop. With (B,) ``seeds``, torch's global CPU
    generator (which torchvision's transforms draw from) is seeded with each image's own seed
    first, so an image gets the same crop whichever rank trains it (the loop's use)."""
    out = []
    for i, img in enumerate(x01):
        if seeds is not None:
            torch.default_generator.manual_seed(int(seeds[i]))
        out.append(transform(img))
    return torch.stack(out).clamp_(0.0, 1.0) if out else x01


def resize_to(x01: Tensor, size: int | None) -> Tensor:
    """(N, 3, H, W) images -> (N, 3, size, size), bilinear with antialiasing (a no-op at that
    size already, or for ``None``)."""
    if size is None or (x01.shape[-2] == size and x01.shape[-1] == size):
        return x01
    return nn.functional.interpolate(
        x01, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )


def spec_at_size(spec: BackboneSpec, size: int | None) -> BackboneSpec:
    """The backbone's preprocessing at another input size (same resize/crop ratio)."""
    if size is None or size == spec.input_size:
        return spec
    return replace(spec, input_size=size, resize=round(size * spec.resize / spec.input_size))


def use_bf16(precision: str, device: torch.device) -> bool:
    """``auto`` means bf16 autocast where the device computes bf16 natively
    (``transferlab.precision.bf16_native``), fp32 elsewhere."""
    from transferlab.precision import bf16_native

    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return bf16_native(device)


def use_channels_last(device: torch.device) -> bool:
    """Train convolutions in channels_last on CPUs: the same arithmetic, and Lite0's training
    step runs about 1.6x faster than in NCHW there (oneDNN; measured at 32-128 px, fp32).
    ``load_backbone`` gives channels_last backbones on every device; on a GPU a backbone in
    another layout is left in it (not measured there)."""
    return device.type == "cpu"


def in_channels_last(module: nn.Module) -> bool:
    """Whether every 4-D weight of ``module`` is laid out channels_last."""
    convs = [p for p in module.parameters() if p.dim() == 4]
    return bool(convs) and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)


def predict(fn, x: Tensor, *, batch_size: int = 64, desc: str | None = None) -> np.ndarray:
    """``transferlab.inference.predict`` as a numpy array (N,) int64, what the metrics take."""
    return inference.predict(fn, x, batch_size=batch_size, desc=desc).numpy()


def trained_parameters(modules: Iterable[nn.Module]) -> int:
    return int(sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad))


def atomic_torch_save(obj: object, dest: Path) -> None:
    """``torch.save`` through ``transferlab.atomic.atomic_write``: a kill never leaves half."""
    with atomic_write(dest) as f:
        torch.save(obj, f)


def split_metrics(
    preds: dict[str, np.ndarray], labels: dict[str, np.ndarray], classes: list[str]
) -> dict:
    """Accuracy per split, and per-class accuracy + confusion matrix on test.

    Args:
        preds, labels: split name ("train" | "val" | "test") -> (N,) int arrays.

    Returns:
        {"<split>_acc": float | None, "<split>_acc_ci_low" / "_ci_high": its 95% Wilson
        interval, "per_class_test_acc": {class: acc | None}, "confusion_test": rows = true
        class, columns = predicted class, "test_pred" / "test_true": the per-image test
        predictions and labels in ``data/split.csv`` order (for paired comparisons)}.
    """
    from transferlab.stats import with_interval

    out: dict = {}
    for s in preds:
        out.update(with_interval(f"{s}_acc", np.asarray(preds[s]) == np.asarray(labels[s])))
    y = np.asarray(labels.get("test", np.zeros(0, int)))
    p = np.asarray(preds.get("test", np.zeros(0, int)))
    out["test_pred"] = np.asarray(p).astype(int).tolist()
    out["test_true"] = np.asarray(y).astype(int).tolist()
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(cm, (y, p), 1)
    out["confusion_test"] = cm.tolist()
    out["per_class_test_acc"] = {
        c: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i, c in enumerate(classes)
    }
    return out
