"""bf16 or fp32: the one rule for "does this device compute bf16 natively", and what
``precision: auto`` asks of bf16 before it is used for features.

``auto`` picks bf16 only where both hold, measured on a sample of the run's own images:

- it is faster here: fp32 time / bf16 time >= ``AUTO_MIN_SPEEDUP`` for the same images;
- it changes no decision: an SVM and a top layer (a softmax linear head) trained on bf16 features
  predict the same class as the same models trained on fp32 features for >= ``AUTO_MIN_AGREEMENT``
  of the held-out images.

Feature cosine alone (the old rule, mean >= 0.999) turned bf16 down everywhere, though the
predictions it leads to agreed; what matters downstream is the predictions.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

# bf16 must be at least this much faster, or fp32 (exact) wins
AUTO_MIN_SPEEDUP = 1.15
# the svm and the top layer must predict the same class for this share of held-out images
AUTO_MIN_AGREEMENT = 0.995
# images the probe extracts both ways (stratified by class): 0.5% needs a few hundred to show
PROBE_IMAGES = 512
# CPU flags that make bf16 worth trying: AMX tiles. AVX512-BF16 alone has the instructions but
# not the speed (a Lite0 training step ran at 0.63x fp32 on such a CPU here, features 0.9-1.5x).
BF16_ISA = frozenset({"amx_bf16"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (so autocast can be faster, not emulated).

    CPUs: AMX (``BF16_ISA``). CUDA: what ``torch.cuda.is_bf16_supported()`` says (Ampere and
    newer). The one rule for fine-tuning's ``auto`` and for whether the feature probe runs at
    all; native is necessary, not sufficient: the probe also measures the speed-up.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(BF16_ISA & cpu_flags())
    return False


def probe_sample(labels: Sequence[str], *, limit: int = PROBE_IMAGES, seed: int = 0) -> list[int]:
    """Indices of up to ``limit`` images, the same share of every class, in a seeded order."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(list(labels))
    if len(labels) <= limit:
        return list(range(len(labels)))
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    share = limit / len(labels)
    picked = [i for idx in by_class for i in idx[: max(2, round(len(idx) * share))]]
    return sorted(picked)[:limit]


def prediction_agreement(
    f32: np.ndarray, f16: np.ndarray, labels: Sequence[str], *, seed: int = 0
) -> dict[str, float | int]:
    """How often models trained on bf16 features predict what the same models trained on fp32
    features predict, on held-out images.

    Args:
        f32, f16: (N, D) features of the same images at fp32 and under bf16 autocast.
        labels: (N,) class names.

    Returns:
        ``{"svm": share, "top": share, "n_test": images}``: shares in [0, 1] over the held-out
        half (every second image of each class); the svm is a standardised linear SVM, the top
        layer a multinomial logistic regression (a softmax linear head), both at fixed settings.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    y = np.asarray(list(labels))
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        test[np.flatnonzero(y == c)[1::2]] = True
    train = ~test
    if len(np.unique(y[train])) < 2 or not test.any():
        return {"svm": 0.0, "top": 0.0, "n_test": int(test.sum())}
    makers = {
        "svm": lambda: make_pipeline(StandardScaler(), LinearSVC(C=0.1, random_state=seed)),
        "top": lambda: make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=500)),
    }
    out: dict[str, float | int] = {"n_test": int(test.sum())}
    for name, make in makers.items():
        pred = [make().fit(f[train], y[train]).predict(f[test]) for f in (f32, f16)]
        out[name] = float((pred[0] == pred[1]).mean())
    return out


def choose(speedup: float, agreement: dict[str, float | int]) -> str:
    """``bf16`` where it is faster and changes (almost) no prediction, else ``fp32``."""
    agrees = min(agreement.get("svm", 0.0), agreement.get("top", 0.0)) >= AUTO_MIN_AGREEMENT
    return "bf16" if speedup >= AUTO_MIN_SPEEDUP and agrees else "fp32"
