"""Which unlabelled images to label next: the query strategies, by name.

Every strategy sees the same inputs: the model's class probabilities on the unlabelled pool
(``probs``, (N, C), rows summing to 1), the pool's cached backbone features (``features``,
(N, D)) and the features of the images already labelled (``labelled``, (L, D)). It returns the
``budget`` pool indices to label, in the order picked, and the score each had when picked
(higher = more wanted).

The uncertainty scores are scikit-activeml's formulas (``uncertainty_scores``), written out so
that a suggest does not import the library's whole pool package. k-center greedy and BADGE are
written here because the library's versions hold an (N, N) utility table
(``k_greedy_center``) or the (N, C*D) gradient embedding (``Badge``: 1 GB for 10,000 images of
1280 features and 10 classes); ours keep O(N) memory. All are cross-checked against the library's
on the same inputs in ``tests/unit/test_active_strategies.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Selection:
    """What a strategy picked.

    Attributes:
        indices: (budget,) pool indices, in the order picked.
        scores: (budget,) the strategy's score of each pick when it was picked.
    """

    indices: np.ndarray
    scores: np.ndarray


@dataclass(frozen=True)
class Strategy:
    """A query strategy.

    Attributes:
        name: its registry key (what params and the CSV name it by).
        needs_model: whether it reads the model's probabilities (random and k-center do not).
        select: ``(probs, features, labelled, budget, rng) -> Selection``.
        doc: one line for ``--help`` and the docs.
    """

    name: str
    needs_model: bool
    select: Callable[..., Selection]
    doc: str


def _top(scores: np.ndarray, budget: int) -> Selection:
    # stable sort on -score: ties keep pool order, so a run is reproducible
    order = np.argsort(-scores, kind="stable")[:budget]
    return Selection(order, scores[order])


def uncertainty_scores(probs: np.ndarray, method: str) -> np.ndarray:
    """scikit-activeml 1.0.1's ``uncertainty_scores`` (no cost matrix), formula for formula.

    Written out because importing ``skactiveml.pool`` imports its whole package (seconds per
    ``label suggest``); ``tests/unit/test_active_strategies.py`` checks equality with it.

    Args:
        probs: (N, C) class probabilities. method: ``least_confident`` | ``margin_sampling`` |
            ``entropy``.

    Returns:
        (N,) scores, higher = more uncertain.
    """
    p = np.asarray(probs, dtype=np.float64)
    if method == "least_confident":
        return 1 - np.max(p, axis=1)
    if method == "margin_sampling":
        two = -np.partition(-p, 1, axis=1)[:, :2]
        return 1 - np.abs(two[:, 0] - two[:, 1])
    if method == "entropy":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.nansum(-p * np.log(p), axis=1)
    raise ValueError(f"unknown uncertainty method {method!r}")


def _uncertainty(method: str) -> Callable[..., Selection]:
    def select(*, probs, budget, **_) -> Selection:
        return _top(uncertainty_scores(probs, method), budget)

    return select


def _random(*, features, budget, rng, **_) -> Selection:
    idx = rng.permutation(len(features))[:budget]
    return Selection(idx, np.zeros(len(idx)))


def _sq_dist_to(x: np.ndarray, x_sq: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(N,) squared euclidean distance of each row of ``x`` to its nearest row of ``centres``."""
    best = np.full(len(x), np.inf)
    for i in range(0, len(centres), 256):  # bounded (N, 256) blocks
        c = centres[i : i + 256]
        d = x_sq[:, None] - 2.0 * (x @ c.T) + np.einsum("ij,ij->i", c, c)[None, :]
        np.minimum(best, d.min(axis=1), out=best)
    return np.maximum(best, 0.0)


def k_center_greedy(features: np.ndarray, labelled: np.ndarray, budget: int) -> Selection:
    """Core-set selection (Sener & Savarese 2018): repeatedly take the pool image farthest from
    everything labelled or already taken.

    Args:
        features: (N, D) pool features. labelled: (L, D) features of the labelled images
            (L may be 0: the first pick is then the image farthest from the pool's mean).
        budget: how many to pick.

    Returns:
        The picks and their distance (euclidean, feature space) to the nearest centre when
        picked.
    """
    x = np.asarray(features, dtype=np.float64)
    x_sq = np.einsum("ij,ij->i", x, x)
    centres = labelled if len(labelled) else x.mean(axis=0, keepdims=True)
    d = _sq_dist_to(x, x_sq, np.asarray(centres, dtype=np.float64))
    picks, scores = [], []
    for _ in range(min(budget, len(x))):
        i = int(np.argmax(d))
        picks.append(i)
        scores.append(float(np.sqrt(d[i])))
        np.minimum(d, np.maximum(x_sq - 2.0 * (x @ x[i]) + x_sq[i], 0.0), out=d)
        d[i] = 0.0
    return Selection(np.array(picks, dtype=np.int64), np.array(scores))


def _k_center(*, features, labelled, budget, **_) -> Selection:
    return k_center_greedy(features, labelled, budget)


def badge(probs: np.ndarray, features: np.ndarray, budget: int, seed: int) -> Selection:
    """BADGE (Ash et al. 2020): k-means++ seeding on the gradient embeddings
    ``g = (p - onehot(argmax p)) (x) h`` of the last layer's loss at the model's own guess.

    The norm of ``g`` is large where the model is unsure (uncertainty); k-means++ spreads the
    picks (diversity). ``<g_i, g_j> = <a_i, a_j> <h_i, h_j>`` with ``a = p - onehot``, so the
    (N, C*D) embedding is never built. Follows scikit-activeml's ``Badge`` step for step (first
    pick: the largest norm; the origin counts as a centre; then D^2 sampling drawn with a
    ``RandomState(seed)``), so the two pick the same images from the same inputs.

    Args:
        probs: (N, C) class probabilities. features: (N, D) the embedding ``h`` fed to the last
            layer. budget: how many to pick. seed: the D^2 sampling's seed.

    Returns:
        The picks and each one's D^2 (squared distance to the nearest centre) when picked.
    """
    p = np.asarray(probs, dtype=np.float64)
    h = np.asarray(features, dtype=np.float64)
    a = p - np.eye(p.shape[1])[p.argmax(axis=1)]
    a_sq, h_sq = np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", h, h)
    g_sq = a_sq * h_sq
    rs = np.random.RandomState(seed)
    d2 = g_sq.copy()  # distance to the origin
    picks, scores = [], []
    for k in range(min(budget, len(p))):
        total = d2.sum()
        if total == 0:  # every image sits on a centre: take the rest uniformly
            w = np.ones(len(p))
            w[picks] = 0.0
            i = int(rs.choice(len(p), 1, replace=False, p=w / w.sum())[0])
        elif k == 0:
            i = int(np.argmax(d2))
        else:
            i = int(rs.choice(len(p), 1, replace=False, p=d2 / total)[0])
        picks.append(i)
        scores.append(float(d2[i]))
        dist = g_sq + g_sq[i] - 2.0 * (a @ a[i]) * (h @ h[i])
        np.minimum(d2, np.maximum(dist, 0.0), out=d2)
        d2[i] = 0.0
    return Selection(np.array(picks, dtype=np.int64), np.array(scores))


def _badge(*, probs, features, budget, rng, **_) -> Selection:
    return badge(probs, features, budget, int(rng.integers(2**31 - 1)))


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("random", False, _random, "uniformly at random (the baseline)"),
        Strategy(
            "least_confidence",
            True,
            _uncertainty("least_confident"),
            "lowest top-class probability",
        ),
        Strategy(
            "margin",
            True,
            _uncertainty("margin_sampling"),
            "smallest gap between the two likeliest classes",
        ),
        Strategy("entropy", True, _uncertainty("entropy"), "highest predictive entropy"),
        Strategy(
            "kcenter",
            False,
            _k_center,
            "k-center greedy core-set: farthest from the labelled set in feature space",
        ),
        Strategy(
            "badge",
            True,
            _badge,
            "BADGE: k-means++ on gradient embeddings (uncertainty and diversity)",
        ),
    )
}


def select(
    strategy: str,
    *,
    budget: int,
    features: np.ndarray,
    labelled: np.ndarray,
    probs: np.ndarray | None = None,
    seed: int = 0,
) -> Selection:
    """Pick ``budget`` images of the pool with ``strategy`` (a key of :data:`STRATEGIES`).

    Args:
        strategy: the strategy's name.
        budget: images to pick (at most the pool's size).
        features: (N, D) the pool's features. labelled: (L, D) the labelled images' features.
        probs: (N, C) the current model's probabilities on the pool; needed by the strategies
            with ``needs_model``.
        seed: for the strategies that draw at random.

    Raises:
        ValueError: an unknown strategy, a budget below 1, or no probabilities where needed.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    if budget < 1:
        raise ValueError(f"budget must be at least 1, got {budget}")
    s = STRATEGIES[strategy]
    if s.needs_model and probs is None:
        raise ValueError(f"strategy {strategy!r} needs the model's probabilities")
    return s.select(
        probs=probs,
        features=features,
        labelled=labelled,
        budget=min(budget, len(features)),
        rng=np.random.default_rng(seed),
    )


def softmax(logits: np.ndarray) -> np.ndarray:
    """(N, C) logits (or SVM decision values) -> (N, C) probabilities."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
