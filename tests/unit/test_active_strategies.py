"""The query strategies: ours against scikit-activeml's on the same inputs, and their basic
promises (budget, no repeats, uncertainty picks the unsure images)."""

from __future__ import annotations

import numpy as np
import pytest
from skactiveml.base import SkactivemlClassifier
from skactiveml.pool import Badge, k_greedy_center

from transferlab.active.strategies import STRATEGIES, badge, k_center_greedy, select, softmax


def _pool(n=120, d=16, c=4, seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d))
    probs = softmax(rng.normal(scale=2.0, size=(n, c)))
    return feats, probs


class _Fixed(SkactivemlClassifier):
    """A 'classifier' whose probabilities and embeddings are given: X holds row indices."""

    def __init__(self, probs=None, emb=None, classes=None, missing_label=np.nan):
        super().__init__(classes=classes, missing_label=missing_label)
        self.probs, self.emb = probs, emb

    def fit(self, X, y, sample_weight=None):
        return self

    def predict_proba(self, X, return_embeddings=False):
        rows = np.asarray(X)[:, 0].astype(int)
        return (self.probs[rows], self.emb[rows]) if return_embeddings else self.probs[rows]


def test_k_center_matches_scikit_activeml():
    feats, _ = _pool()
    labelled, pool = feats[:10], feats[10:]
    ours = k_center_greedy(pool, labelled, 15)
    y = np.r_[np.zeros(10), np.full(len(pool), np.nan)]
    theirs, _ = k_greedy_center(feats, y, batch_size=15, random_state=0)
    np.testing.assert_array_equal(ours.indices, np.asarray(theirs) - 10)
    assert np.all(np.diff(ours.scores) <= 1e-9)  # each pick is no farther than the one before


def test_badge_matches_scikit_activeml():
    feats, probs = _pool(n=80, d=8, c=3, seed=1)
    # scikit-activeml seeds its draws from RandomState(7) and the number of unlabelled images
    derived = int(np.random.RandomState(7).randint(1, 2**31) * (len(feats) + 1) % 2**31)
    ours = badge(probs, feats, 12, seed=derived)
    X = np.arange(len(feats), dtype=float)[:, None]
    clf = _Fixed(probs=probs, emb=feats, classes=[0, 1, 2])
    theirs = Badge(clf_embedding_flag_name="return_embeddings", random_state=7).query(
        X, np.full(len(feats), np.nan), clf, fit_clf=False, batch_size=12
    )
    np.testing.assert_array_equal(ours.indices, theirs)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_picks_budget_distinct_pool_images(name):
    feats, probs = _pool()
    sel = select(name, budget=20, features=feats[10:], labelled=feats[:10], probs=probs[10:])
    assert len(sel.indices) == 20 == len(set(sel.indices.tolist()))
    assert sel.indices.min() >= 0 and sel.indices.max() < len(feats) - 10


def test_margin_picks_the_most_ambiguous():
    probs = np.array([[0.98, 0.01, 0.01], [0.5, 0.49, 0.01], [0.7, 0.2, 0.1]])
    sel = select(
        "margin", budget=2, features=np.zeros((3, 2)), labelled=np.zeros((0, 2)), probs=probs
    )
    assert sel.indices.tolist() == [1, 2]


def test_unknown_strategy_names_the_choices():
    with pytest.raises(ValueError, match="choose one of: random"):
        select("bald", budget=1, features=np.zeros((3, 2)), labelled=np.zeros((0, 2)))


@pytest.mark.parametrize("method", ["least_confident", "margin_sampling", "entropy"])
def test_uncertainty_scores_equal_scikit_activeml(method):
    from skactiveml.pool import uncertainty_scores as library

    from transferlab.active.strategies import uncertainty_scores

    rng = np.random.default_rng(3)
    probs = softmax(rng.normal(size=(200, 6)) * 3)
    probs[0] = np.eye(6)[2]  # a certain row: entropy has 0 * log 0
    assert np.array_equal(uncertainty_scores(probs, method), library(probs, method=method))
