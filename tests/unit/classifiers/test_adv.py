"""Adversarial fine-tuning (method ``adv``) on a random-weight Lite0 and tiny images: the eps
ramp, the three trainable set-ups, robust model selection, and resume after a kill."""

from __future__ import annotations

import pytest
import torch

from transferlab.classifiers.adv import ramped_eps, robust_accuracy, train_adv
from transferlab.classifiers.training import make_head
from transferlab.methods import AdvParams

FAST = {
    "image_size": 32,
    "batch_size": 6,
    "augment": False,
    "epochs": 2,
    "min_steps": 1,
    "eps": 2 / 255,
}


def _train(backbone, images, tmp_path=None, hook=None, **kw):
    x, y, xv, yv = images
    head = make_head("linear", backbone.feature_dim, 3)
    params = AdvParams(**{**FAST, "init": "imagenet", "steps": 2, "val_steps": 2, **kw})
    res = train_adv(
        backbone=backbone, head=head, n_classes=3, params=params, x_train=x, y_train=y,
        x_val=xv, y_val=yv, input_size=32, device="cpu", on_epoch_end=hook,
        checkpoint=None if tmp_path is None else tmp_path / "adv.pt", fingerprint="t",
    )  # fmt: skip
    return res, head


def test_eps_ramps_up_then_holds() -> None:
    assert [round(ramped_eps(4.0, s, 4), 3) for s in range(6)] == [1, 2, 3, 4, 4, 4]
    assert ramped_eps(4.0, 0, 0) == 4.0


@pytest.mark.parametrize(
    "setup",
    [{"loss": "pgd"}, {"loss": "pgd", "clean_mix": 0.5}, {"loss": "trades"}, {"scope": "top"}],
    ids=["madry", "madry-mixed", "trades", "top-only"],
)
def test_trains_and_selects_on_robust_val(random_lite0, tiny_images, setup) -> None:
    before = [p.detach().clone() for p in random_lite0.body.parameters()]
    res, head = _train(random_lite0, tiny_images, **setup)
    assert [h["epoch"] for h in res.history] == [0, 1]
    assert res.history[0]["train_eps"] < res.history[1]["train_eps"] == pytest.approx(2 / 255)
    _, _, xv, yv = tiny_images
    net = _Clf(random_lite0, head).eval()  # the kept model, as the loop left it
    kept = res.history[res.best_epoch]["val_acc"]
    assert kept == max(h["val_acc"] for h in res.history)
    assert kept == robust_accuracy(net, xv, yv, eps=2 / 255, steps=2, batch_size=64, seed=0)
    with torch.no_grad():
        clean = float((net(xv).argmax(1) == yv).float().mean())
    assert kept <= clean
    moved = any(
        not torch.equal(a, b) for a, b in zip(before, random_lite0.body.parameters(), strict=True)
    )
    assert moved == (setup.get("scope", "full") == "full")


class _Clf(torch.nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        return self.head(self.backbone.features(x))


def test_resume_after_a_kill_matches_an_uninterrupted_run(tiny_images, tmp_path) -> None:
    from transferlab.backbones import load_backbone

    def fresh():
        torch.manual_seed(0)
        return load_backbone("efficientnet_lite0", "none")

    class Killed(Exception):
        pass

    def kill_after_first(row):
        if row["epoch"] == 0:
            raise Killed

    with pytest.raises(Killed):
        _train(fresh(), tiny_images, tmp_path, hook=kill_after_first)
    resumed, head_r = _train(fresh(), tiny_images, tmp_path)
    straight, head_s = _train(fresh(), tiny_images)
    assert resumed.resumed_from == 1
    for a, b in zip(head_r.parameters(), head_s.parameters(), strict=True):
        torch.testing.assert_close(a, b)
