import logging

import pytest
import torch

from transferlab.classifiers import Classifier
from transferlab.classifiers.top import train_top
from transferlab.config import TopParams


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_cached_features_and_frozen_backbone_give_the_same_head(random_lite0, tiny_images):
    x, y, xv, yv = tiny_images
    params = TopParams(epochs=4, batch_size=4, lr=0.05, head="mlp", dropout=0.3, seed=3)
    with torch.no_grad():
        fx, fv = random_lite0.features(x), random_lite0.features(xv)
    on_features = train_top(n_classes=3, params=params, x_train=fx, y_train=y, x_val=fv, y_val=yv)
    through = train_top(
        n_classes=3,
        params=params,
        x_train=x,
        y_train=y,
        x_val=xv,
        y_val=yv,
        backbone=random_lite0,
    )
    for (k, a), b in zip(
        on_features.head.state_dict().items(), through.head.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    assert [h["val_acc"] for h in on_features.history] == [h["val_acc"] for h in through.history]


def test_augmented_training_leaves_the_backbone_and_its_batchnorm_untouched(
    random_lite0, tiny_images
):
    x, y, _, _ = tiny_images
    before = _state(random_lite0)
    result = train_top(
        n_classes=3,
        params=TopParams(epochs=2, batch_size=6, augment=True, lr=0.5),
        x_train=x,
        y_train=y,
        backbone=random_lite0,
    )
    assert not random_lite0.training
    bns = [m for m in random_lite0.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    for k, v in random_lite0.state_dict().items():  # conv weights and running stats alike
        assert torch.equal(v, before[k]), k
    assert any(k.endswith("running_mean") for k in before)
    # and a Classifier built on it keeps BatchNorm in eval mode even in train()
    clf = Classifier(random_lite0, result.head, ["a", "b", "c"], "top").train()
    assert clf.head.training and not any(m.training for m in bns)


def test_early_stopping_keeps_the_best_epoch(tiny_images):
    torch.manual_seed(0)
    x, y, xv, _ = tiny_images
    fx, fv = torch.randn(12, 8), torch.randn(6, 8)
    yv = torch.tensor([0, 1, 2, 2, 1, 0])
    res = train_top(
        n_classes=3,
        params=TopParams(epochs=50, patience=2, lr=0.5, batch_size=4),
        x_train=fx,
        y_train=y,
        x_val=fv,
        y_val=yv,
    )
    vals = [h["val_acc"] for h in res.history]
    assert len(vals) < 50  # random features: val accuracy stalls and training stops
    assert vals[res.best_epoch] == max(vals)
    assert len(vals) == res.best_epoch + 1 + 2
    kept = (res.head(fv).argmax(1) == yv).float().mean().item()
    assert kept == pytest.approx(max(vals))


def test_rmsprop_is_allowed_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        train_top(
            n_classes=2,
            params=TopParams(epochs=1, optimizer="rmsprop"),
            x_train=torch.randn(4, 5),
            y_train=torch.tensor([0, 1, 0, 1]),
        )
    assert "rmsprop" in caplog.text.lower() and "SGD" in caplog.text
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        train_top(
            n_classes=2,
            params=TopParams(epochs=1),
            x_train=torch.randn(4, 5),
            y_train=torch.tensor([0, 1, 0, 1]),
        )
    assert "rmsprop" not in caplog.text.lower()


def test_augmentation_needs_images():
    with pytest.raises(ValueError, match="augmentation needs images"):
        train_top(
            n_classes=2,
            params=TopParams(augment=True),
            x_train=torch.randn(4, 5),
            y_train=torch.tensor([0, 1, 0, 1]),
        )
