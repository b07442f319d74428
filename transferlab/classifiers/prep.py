"""One feature preprocessing for every method that reads features (``features.preprocess``).

The SVM and the top layer see the same transform of the same features, fitted on the training
split only, so their comparison is between classifiers, not feature scalings. The transform
lives inside the stored head (:class:`Prepped`), so the classifier still maps raw backbone
features, and so images in [0, 1], to logits, and attacks reach it end to end.

``auto`` picks, on the validation split, the transform under which a linear SVM probe (a fixed
C grid, independent of any method's settings) scores best; ties go to the simpler one.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

PREPS = ("none", "standardize", "l2")
# the probe's C grid for ``auto``: wide, since the best C depends on the transform's scale
PROBE_C = (0.01, 0.1, 1.0, 10.0)


class FeaturePrep(nn.Module):
    """(N, D) features -> (N, D) transformed features; no trainable parameters.

    ``standardize``: (f - mean) / scale with the training split's statistics (as sklearn's
    StandardScaler, a zero spread counts as 1); ``l2``: each row to unit length; ``none``.
    """

    def __init__(self, kind: str, dim: int):
        super().__init__()
        if kind not in PREPS:
            raise ValueError(f"unknown preprocessing {kind!r}; allowed values are {list(PREPS)}")
        self.kind = kind
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def forward(self, f: Tensor) -> Tensor:
        if self.kind == "standardize":
            return (f - self.mean) / self.scale
        if self.kind == "l2":
            return nn.functional.normalize(f, dim=1)
        return f


def fit_prep(kind: str, x_train: np.ndarray | Tensor) -> FeaturePrep:
    """The transform ``kind`` with its statistics from the training features (N, D)."""
    x = torch.as_tensor(np.asarray(x_train), dtype=torch.float64)
    prep = FeaturePrep(kind, x.shape[1])
    if kind == "standardize" and len(x):
        std = x.std(0, unbiased=False)
        prep.mean.copy_(x.mean(0).float())
        prep.scale.copy_(torch.where(std > 0, std, torch.ones_like(std)).float())
    return prep


def apply_prep(prep: FeaturePrep, x: np.ndarray) -> np.ndarray:
    """``prep`` on numpy features (for sklearn), in float64 like the sklearn scaler."""
    with torch.no_grad():
        return prep.double()(torch.as_tensor(np.asarray(x), dtype=torch.float64)).numpy()


class Prepped(nn.Module):
    """A head behind a fixed feature transform: (N, D) raw features -> (N, C) logits."""

    def __init__(self, prep: FeaturePrep, head: nn.Module):
        super().__init__()
        self.prep = prep
        self.head = head

    def forward(self, f: Tensor) -> Tensor:
        return self.head(self.prep(f))


def wrap(prep: FeaturePrep, head: nn.Module) -> nn.Module:
    """``head`` behind ``prep`` (``none`` adds nothing, so such heads store as before)."""
    return head if prep.kind == "none" else Prepped(prep.float(), head)


def choose_prep(
    key: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    seed: int = 0,
) -> tuple[str, dict[str, float]]:
    """The transform to use: ``key`` itself, or for ``auto`` the best on validation.

    Returns:
        (chosen kind, val accuracy of the probe per kind; empty unless ``auto`` had a val set).
    """
    if key != "auto":
        return key, {}
    if len(y_val) == 0 or len(np.unique(y_train)) < 2:
        log.warning("features.preprocess auto: no validation split to choose on; using none")
        return "none", {}
    from sklearn.svm import LinearSVC

    scores: dict[str, float] = {}
    for kind in PREPS:
        prep = fit_prep(kind, x_train)
        xt, xv = apply_prep(prep, x_train), apply_prep(prep, x_val)
        scores[kind] = max(
            float(
                (
                    LinearSVC(C=c, dual="auto", max_iter=10_000, random_state=seed)
                    .fit(xt, y_train)
                    .predict(xv)
                    == y_val
                ).mean()
            )
            for c in PROBE_C
        )
    chosen = max(PREPS, key=lambda k: (scores[k], -PREPS.index(k)))
    shown = ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
    log.info("features.preprocess auto: %s (probe val accuracy: %s)", chosen, shown)
    return chosen, scores
