import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from transferlab.classifiers import Classifier, load_classifier, save_classifier
from transferlab.classifiers.finetune import warmup_cosine
from transferlab.classifiers.full import _groups, train_full
from transferlab.config import FullParams

FAST = {"image_size": 32, "batch_size": 6, "augment": False, "resume": True}

# Trains a random-weight Lite0 on fixed data; optionally sleeps after an epoch so the parent
# can kill it there. Prints the final weights' digest as JSON.
SCRIPT = """
import json, sys, time, torch
from pathlib import Path
from transferlab.backbones import load_backbone
from transferlab.classifiers.full import train_full
from transferlab.config import FullParams

ckpt, sleep_after = Path(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
bb = load_backbone("efficientnet_lite0", "none")
g = torch.Generator().manual_seed(1)
x, y = torch.rand(12, 3, 32, 32, generator=g), torch.arange(12) % 3
def hook(row):
    if row["epoch"] == sleep_after:
        print("SLEEPING", flush=True)
        time.sleep(600)
res = train_full(backbone=bb, n_classes=3, x_train=x, y_train=y, checkpoint=ckpt,
                 params=FullParams(epochs=3, image_size=32, batch_size=6, augment=True,
                                   dropout=0.5, head="mlp", lr=0.05),
                 on_epoch_end=hook, fingerprint="test")
w = [float(p.double().sum()) for p in [*bb.parameters(), *res.head.parameters()]]
print(json.dumps({"resumed_from": res.resumed_from, "weights": w,
                  "train_acc": [h["train_acc"] for h in res.history]}))
"""


def _run(script: Path, ckpt: Path, sleep_after: int = -1) -> dict:
    out = subprocess.run(
        [sys.executable, str(script), str(ckpt), str(sleep_after)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    ckpt = tmp_path / "killed" / "full.pt"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ckpt), "0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout.readline().strip() == "SLEEPING"  # epoch 0 done and checkpointed
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(ckpt, weights_only=True)["epoch"] == 0
    assert not list(ckpt.parent.glob(".*.tmp"))  # atomic: no half-written checkpoint left
    resumed = _run(script, ckpt)
    straight = _run(script, tmp_path / "straight" / "full.pt")
    assert resumed["resumed_from"] == 1 and straight["resumed_from"] == -1
    assert resumed["train_acc"] == straight["train_acc"]
    assert resumed["weights"] == pytest.approx(straight["weights"], rel=1e-5, abs=1e-5)


def test_param_groups_schedule_and_gradual_unfreezing(random_lite0, tiny_images):
    # no val: the last epoch is kept (with val, an epoch 0 that scored higher would be kept,
    # and the top group would come back untrained)
    x, y, _, _ = tiny_images
    groups = _groups(random_lite0, 2)
    before = [[p.detach().clone() for p in g] for g in groups]
    params = FullParams(
        **FAST,
        epochs=2,
        lr=0.1,
        backbone_lr_ratio=0.2,
        gradual_unfreeze=True,
        unfreeze_groups=2,
        warmup_epochs=1.0,
        patience=5,
    )
    res = train_full(
        backbone=random_lite0,
        n_classes=3,
        params=params,
        x_train=x,
        y_train=y,
    )
    hist = res.history
    assert [h["unfrozen_groups"] for h in hist] == [0, 1]
    for h in hist:
        assert h["lr_backbone"] == pytest.approx(h["lr_head"] * 0.2)
        assert h["train_acc"] is not None and 0 <= h["train_acc"] <= 1
    # input-side group never trained; the top group trained in epoch 1
    assert all(torch.equal(a, b) for a, b in zip(before[0], groups[0], strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(before[1], groups[1], strict=True))
    assert res.trained_parameters > 3_000_000
    assert not any(p.requires_grad for p in random_lite0.parameters())


def test_warmup_then_cosine():
    f = warmup_cosine(total=10, warmup=2)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(9) < 0.1
    assert all(f(i) >= f(i + 1) for i in range(2, 9))
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_stale_checkpoint_is_not_resumed(random_lite0, tiny_images, tmp_path, caplog):
    x, y, _, _ = tiny_images
    ckpt = tmp_path / "full.pt"
    kw = dict(backbone=random_lite0, n_classes=3, x_train=x, y_train=y, checkpoint=ckpt)
    train_full(params=FullParams(**FAST, epochs=1), fingerprint="a", **kw)
    res = train_full(params=FullParams(**FAST, epochs=1), fingerprint="b", **kw)
    assert res.resumed_from == -1 and "starting afresh" in caplog.text


def test_full_classifier_round_trips_with_its_weights_and_input_size(
    random_lite0, tiny_images, tmp_path
):
    x, y, _, _ = tiny_images
    res = train_full(
        backbone=random_lite0,
        n_classes=3,
        params=FullParams(**FAST, epochs=1, head="mlp"),
        x_train=x,
        y_train=y,
        input_size=24,
    )
    clf = Classifier(res.backbone, res.head, ["a", "b", "c"], "full", input_size=24).eval()
    save_classifier(clf, tmp_path / "full", pretrained="none")
    meta = json.loads((tmp_path / "full" / "meta.json").read_text())
    assert meta["input_size"] == 24 and meta["head"]["kind"] == "mlp"
    assert (tmp_path / "full" / "backbone.pt").exists()
    back = load_classifier(tmp_path / "full")
    # it takes the same images as every model and sees them at the size it was trained at
    assert back.input_size == 24 and back.backbone.spec.input_size == 224
    with torch.no_grad():
        torch.testing.assert_close(back(x), clf(x))
        small = torch.nn.functional.interpolate(
            x, size=(24, 24), mode="bilinear", antialias=True, align_corners=False
        )
        torch.testing.assert_close(back(x), back.head(back.backbone.features(small)))
    # A save killed between its renames: new backbone weights beside the old meta.json.
    torch.save({k: v + 1 for k, v in clf.backbone.state_dict().items()}, tmp_path / "x.pt")
    (tmp_path / "x.pt").replace(tmp_path / "full" / "backbone.pt")
    with pytest.raises(RuntimeError, match="interrupted"):
        load_classifier(tmp_path / "full")


def test_trained_parameters_leave_out_the_unused_imagenet_head(random_lite0, tiny_images):
    x, y, _, _ = tiny_images
    res = train_full(
        backbone=random_lite0,
        n_classes=3,
        params=FullParams(**FAST, epochs=1),
        x_train=x,
        y_train=y,
    )
    body = sum(p.numel() for p in random_lite0.body.parameters())
    imagenet_head = sum(p.numel() for p in random_lite0.head.parameters())
    assert imagenet_head > 1_000_000  # 1280 x 1000 + 1000
    assert res.trained_parameters == body + sum(p.numel() for p in res.head.parameters())


def test_overfitting_warning(random_lite0, caplog):
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32)
    y = torch.tensor([0, 1, 2])
    xv = torch.rand(6, 3, 32, 32)
    yv = torch.tensor([2, 0, 1, 1, 2, 0])
    res = train_full(
        backbone=random_lite0,
        n_classes=3,
        x_train=x,
        y_train=y,
        x_val=xv,
        y_val=yv,
        params=FullParams(**FAST, epochs=15, lr=0.5, patience=15, warmup_epochs=0),
    )
    accs = [(h["train_acc"], h["val_acc"]) for h in res.history]
    lagging = [a for a in accs if a[0] == 1.0 and a[1] < 0.9]
    assert lagging, accs  # three images are memorised; random val labels cannot follow
    assert "overfitting" in caplog.text


def test_the_backbone_comes_back_in_the_layout_it_came_in(random_lite0, tiny_images):
    """Trained in channels_last on a CPU either way; load_backbone's stay so, an NCHW one too."""
    from transferlab.classifiers.training import in_channels_last

    x, y, _, _ = tiny_images
    params = FullParams(**FAST, epochs=1)
    assert in_channels_last(random_lite0)  # load_backbone's layout
    train_full(backbone=random_lite0, n_classes=3, params=params, x_train=x, y_train=y)
    assert in_channels_last(random_lite0)
    random_lite0.to(memory_format=torch.contiguous_format)
    assert not in_channels_last(random_lite0)
    train_full(backbone=random_lite0, n_classes=3, params=params, x_train=x, y_train=y)
    assert not in_channels_last(random_lite0)
    assert all(p.is_contiguous() for p in random_lite0.parameters())


@pytest.mark.parametrize("damage", ["truncated", "planted-pickle"])
def test_a_damaged_checkpoint_is_never_unpickled(
    random_lite0, tiny_images, tmp_path, damage, caplog
):
    """A truncated checkpoint is a lost cache (start afresh); a planted pickle is refused."""
    from tests.unit.test_tensor_files import plant_pickle
    from transferlab.tensor_files import UnsafeFileError

    x, y, _, _ = tiny_images
    ckpt = tmp_path / "full.pt"
    marker = tmp_path / "pwned"
    if damage == "truncated":
        ckpt.write_bytes(b"PK\x03\x04 truncated")
    else:
        plant_pickle(ckpt, marker)
    params = FullParams(**FAST, epochs=1)
    kwargs = dict(backbone=random_lite0, n_classes=3, x_train=x, y_train=y, params=params)
    if damage == "truncated":
        res = train_full(**kwargs, checkpoint=ckpt, fingerprint="t")
        assert res.resumed_from == -1 and "starting afresh" in caplog.text
        assert str(ckpt) in caplog.text
    else:
        with pytest.raises(UnsafeFileError, match="refusing to load"):
            train_full(**kwargs, checkpoint=ckpt, fingerprint="t")
        assert not marker.exists()
