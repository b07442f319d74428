"""The shared training loop's protocol pieces: the under-trained check, the step budget, trial
choice on val, and the one feature preprocessing the svm and the top layer share."""

import numpy as np
import pytest
import torch

from tests.conftest import REPO
from transferlab.classifiers.loop import choose_trial, epoch_budget, under_trained
from transferlab.classifiers.prep import FeaturePrep, apply_prep, choose_prep, fit_prep, wrap
from transferlab.classifiers.top import train_top
from transferlab.classifiers.training import head_from_spec, head_spec
from transferlab.config import FullParams, load_params


def _rows(vals, train=1.0):
    return [{"epoch": i, "val_acc": v, "train_acc": train} for i, v in enumerate(vals)]


def test_under_trained_fires_while_val_still_rises_and_when_train_stays_low():
    one_epoch = under_trained(_rows([0.6]), n_classes=5, stopped_early=False)
    assert one_epoch["under_trained"] and "still rising" in one_epoch["why"]
    rising = under_trained(_rows([0.4, 0.5, 0.6, 0.7]), n_classes=5, stopped_early=False)
    assert rising["under_trained"]
    plateau = under_trained(_rows([0.4, 0.8, 0.8, 0.8]), n_classes=5, stopped_early=False)
    assert plateau == {"under_trained": False, "why": ""}
    stopped = under_trained(_rows([0.4, 0.8, 0.7, 0.7]), n_classes=5, stopped_early=True)
    assert not stopped["under_trained"]
    low = under_trained(_rows([0.5, 0.5, 0.5], train=0.4), n_classes=5, stopped_early=True)
    assert low["under_trained"] and "training accuracy stayed low" in low["why"]


def test_a_one_epoch_full_fine_tuning_is_flagged(random_lite0, tiny_images):
    from transferlab.classifiers.full import train_full

    x, y, xv, yv = tiny_images
    res = train_full(
        backbone=random_lite0,
        n_classes=3,
        params=FullParams(epochs=1, batch_size=6, augment=False, image_size=32),
        x_train=x,
        y_train=y,
        x_val=xv,
        y_val=yv,
    )
    assert len(res.history) == 1 and res.sanity["under_trained"], res.sanity


def test_the_default_top_layer_converges_without_a_flag():
    """params.yaml's top section (each of its trials) on separable features: silent."""
    top = load_params(REPO / "params.yaml").top
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 64, generator=g) * 3

    def make(n):
        y = torch.arange(n) % 5
        return centres[y] + torch.randn(n, 64, generator=g), y

    x, y = make(100)
    xv, yv = make(40)
    for trial in top.trials():
        res = train_top(
            n_classes=5, params=top.with_trial(trial), x_train=x, y_train=y, x_val=xv, y_val=yv
        )
        assert res.sanity == {"under_trained": False, "why": ""}, (trial, res.history)


def test_the_same_seed_gives_the_same_head(tiny_images):
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(0))
    y = torch.arange(12) % 3
    top = load_params(REPO / "params.yaml").top.with_trial({})
    a = train_top(n_classes=3, params=top, x_train=x, y_train=y, x_val=x, y_val=y)
    b = train_top(n_classes=3, params=top, x_train=x, y_train=y, x_val=x, y_val=y)
    assert a.history == [{**h, "seconds": a.history[i]["seconds"]} for i, h in enumerate(b.history)]
    for k, v in a.head.state_dict().items():
        assert torch.equal(v, b.head.state_dict()[k]), k


def test_the_step_budget_grows_with_the_training_set():
    assert epoch_budget(epochs=10, min_steps=0, n_train=100, batch_size=16) == 10
    # a tiny set: more epochs, so at least min_steps optimiser steps
    assert epoch_budget(epochs=10, min_steps=100, n_train=16, batch_size=16) == 100
    assert epoch_budget(epochs=10, min_steps=100, n_train=1600, batch_size=16) == 10


def test_trials_are_chosen_on_val_first_of_equals_and_not_without_val():
    trials = [{"lr": 0.1}, {"lr": 0.2}, {"lr": 0.3}]
    scores = {0.1: 0.5, 0.2: 0.7, 0.3: 0.7}
    res, sel = choose_trial("t", trials, lambda k, t: t["lr"], lambda r: scores[r])
    assert res == 0.2 and sel["chosen"] == {"lr": 0.2}
    assert [t["val_acc"] for t in sel["trials"]] == [0.5, 0.7, 0.7]
    calls = []
    res, sel = choose_trial("t", trials, lambda k, t: calls.append(k) or k, lambda r: None)
    assert calls == [0] and sel["chosen"] == {"lr": 0.1}


def test_one_preprocessing_fitted_on_train_and_stored_with_the_head():
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(3, 2, size=(20, 6)).astype(np.float32)
    x[:, 2] = 1.0  # no spread: divided by 1, as sklearn does
    std = apply_prep(fit_prep("standardize", x), x)
    np.testing.assert_allclose(std, StandardScaler().fit_transform(x), atol=1e-5)
    l2 = apply_prep(fit_prep("l2", x), x)
    np.testing.assert_allclose(np.linalg.norm(l2, axis=1), 1.0, rtol=1e-6)
    # the transform travels with the head: rebuilt from meta.json + the state dict
    prep = fit_prep("standardize", x).float()
    head = wrap(prep, torch.nn.Linear(6, 3))
    back = head_from_spec(head_spec(head))
    back.load_state_dict(head.state_dict())
    t = torch.from_numpy(x)
    torch.testing.assert_close(back(t), head(t))
    assert head_spec(wrap(FeaturePrep("none", 6), torch.nn.Linear(6, 3)))["kind"] == "linear"


def test_preprocessing_auto_chooses_on_val_and_a_fixed_key_is_kept():
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    # the class is in the direction, not the length: l2 wins
    x = (np.eye(3)[y] + 0.3 * rng.normal(size=(60, 3))) * rng.uniform(0.1, 50, size=(60, 1))
    kind, scores = choose_prep("auto", x[:40], y[:40], x[40:], y[40:])
    assert kind == max(scores, key=scores.get) and set(scores) == {"none", "standardize", "l2"}
    assert choose_prep("standardize", x[:40], y[:40], x[40:], y[40:]) == ("standardize", {})


def test_unequal_trials_are_refused(tmp_path):
    from transferlab.config import ParamsError

    p = tmp_path / "params.yaml"
    p.write_text("svm: {C: [0.1, 1.0]}\ntop: {search: {lr: [0.01]}}\n")
    with pytest.raises(ParamsError, match="same number of hyperparameter trials, got svm 2, top 1"):
        load_params(p)
    p.write_text("top: {search: {lrr: [0.01]}}\n")
    with pytest.raises(ParamsError, match="unknown key 'lrr'"):
        load_params(p)
