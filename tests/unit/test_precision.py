"""bf16 autocast against fp32 on real photos: the bar ``precision: auto`` must clear."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transferlab.features import AUTOCAST, cosine_agreement, probe_bf16, resolve_precision
from transferlab.precision import AUTO_MIN_AGREEMENT, choose, prediction_agreement, probe_sample

pytestmark = pytest.mark.slow


def features(backbone, x: torch.Tensor, precision: str, batch: int = 16) -> np.ndarray:
    dtype = AUTOCAST[precision]
    model = backbone.to(memory_format=torch.channels_last)
    out = []
    with (
        torch.inference_mode(),
        torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None),
    ):
        for i in range(0, len(x), batch):
            xb = x[i : i + batch].contiguous(memory_format=torch.channels_last)
            out.append(model.features(xb).float().numpy())
    return np.concatenate(out)


def test_bf16_agrees_with_fp32_on_the_imagenet_photos(lite0, imagenet_photos):
    x, labels = imagenet_photos
    f32, f16 = features(lite0, x, "fp32"), features(lite0, x, "bf16")
    mean_cos, min_cos = cosine_agreement(f32, f16)
    assert mean_cos >= 0.999 and min_cos >= 0.99, (mean_cos, min_cos)
    with torch.inference_mode():
        top1_32 = lite0.head(torch.from_numpy(f32)).argmax(1)
        top1_16 = lite0.head(torch.from_numpy(f16)).argmax(1)
    assert torch.equal(top1_32, top1_16)
    # and the photos are really recognised, so the comparison means something
    assert (top1_32 == labels).sum() >= 15


def test_svm_on_bf16_features_is_within_half_a_point_of_fp32(lite0):
    from transferlab.classifiers.svm import fit_svm
    from transferlab.config import TuxpaintSource
    from transferlab.data.sources import list_source
    from transferlab.features import load_images

    source = TuxpaintSource()
    if not source.path.is_dir():
        pytest.fail(f"{source.path} missing: apt-get install tuxpaint-stamps-default (.ci/run)")
    files, classes = list_source(source)
    rng = np.random.default_rng(0)
    # 16 photos per class keeps the test quick (decoding the large stamps dominates)
    files = [
        files[i]
        for c in classes
        for i in rng.permutation([j for j, f in enumerate(files) if f.label == c])[:16]
    ]
    x = load_images([f.path for f in files], lite0.spec)
    y = np.array([classes.index(f.label) for f in files])
    test = np.arange(len(files)) % 3 == 0
    acc = {}
    for precision in ("fp32", "bf16"):
        f = features(lite0, x, precision)
        fit = fit_svm(f[~test], y[~test], C_grid=(0.01, 0.1), cv=3, class_weight="balanced")
        acc[precision] = float((fit.pipeline.predict(f[test]) == y[test]).mean())
    assert acc["fp32"] > 0.6  # five real classes: far above chance
    assert abs(acc["bf16"] - acc["fp32"]) <= 0.005, acc


def test_auto_picks_bf16_only_where_faster_and_predictions_agree():
    agree = {"svm": 1.0, "top": 0.996, "n_test": 500}
    assert choose(1.5, agree) == "bf16"
    assert choose(1.1, agree) == "fp32"  # not faster enough: exact fp32 wins
    assert choose(3.0, {**agree, "top": AUTO_MIN_AGREEMENT - 0.001}) == "fp32"
    assert choose(3.0, {}) == "fp32"  # nothing measured, nothing chosen


def test_prediction_agreement_counts_changed_predictions():
    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b", "c"], 40)
    f32 = rng.normal(0, 1, (120, 16)) + (np.arange(120)[:, None] // 40) * 3.0
    same = prediction_agreement(f32, f32.copy(), y)
    assert same == {"svm": 1.0, "top": 1.0, "n_test": 60}
    # features scrambled for half the images: those predictions change
    noisy = f32.copy()
    noisy[::2] = rng.normal(0, 1, noisy[::2].shape) * 10
    worse = prediction_agreement(f32, noisy, y)
    assert worse["svm"] < 0.9 and worse["top"] < 0.9
    # the probe sample keeps every class, in proportion, and is capped
    labels = ["a"] * 900 + ["b"] * 300
    picked = probe_sample(labels, limit=400)
    assert len(picked) == 400 and sum(labels[i] == "b" for i in picked) == 100


def test_auto_probes_the_run_s_images_and_stores_the_verdict(
    lite0, tiny_dataset, tmp_path, monkeypatch
):
    import json

    import transferlab.features

    files = sorted(tiny_dataset.rglob("*.png"))
    labels = [f.parent.name for f in files]
    # without labels there is nothing to judge bf16 by
    assert resolve_precision("auto", lite0, files, cache_root=tmp_path) == "fp32"
    # on any machine: pretend bf16 is native, so the probe runs and its verdict is stored
    monkeypatch.setattr(transferlab.features, "bf16_native", lambda device: True)
    choice = resolve_precision("auto", lite0, files, labels=labels, cache_root=tmp_path)
    store = tmp_path / "precision.json"
    (verdict,) = json.loads(store.read_text()).values()
    assert verdict["choice"] == choice == choose(verdict["speedup"], verdict)
    assert verdict["n_test"] == 12 and 0 <= verdict["svm"] <= 1 and 0 <= verdict["top"] <= 1
    # stored: a second call does not probe again
    mtime = store.stat().st_mtime_ns
    monkeypatch.setattr(transferlab.features, "probe_bf16", None)  # would fail if called
    assert resolve_precision("auto", lite0, files, labels=labels, cache_root=tmp_path) == choice
    assert store.stat().st_mtime_ns == mtime
    assert resolve_precision("fp16", lite0, files, cache_root=tmp_path) == "fp16"


def test_probe_on_real_photos_keeps_their_predictions(lite0, imagenet_photos):
    x, labels = imagenet_photos
    # 20 photos of 20 classes: pair them up into two "classes" so models can be trained
    verdict = probe_bf16(lite0, x, [str(int(c) % 2) for c in labels], batch_size=10)
    assert verdict["speedup"] > 0 and verdict["n_test"] == 10
    assert verdict["mean_cos"] >= 0.999
