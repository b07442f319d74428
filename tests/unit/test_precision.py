"""bf16 autocast against fp32 on real photos: the bar ``precision: auto`` must clear."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transferlab.features import (
    AGREE_MEAN_COS,
    AGREE_MIN_COS,
    AUTOCAST,
    bf16_capable,
    cosine_agreement,
    resolve_precision,
)

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
    assert mean_cos >= AGREE_MEAN_COS and min_cos >= AGREE_MIN_COS, (mean_cos, min_cos)
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


def test_auto_picks_bf16_only_where_native_faster_and_agreeing(lite0, tmp_path):
    from importlib import resources
    from pathlib import Path

    photos = sorted(Path(str(resources.files("foolbox") / "data")).glob("imagenet_*"))
    photos = photos[:8]  # one probe batch
    choice = resolve_precision("auto", lite0, photos, cache_root=tmp_path, batch_size=8)
    if not bf16_capable(torch.device("cpu")):
        assert choice == "fp32"
        return
    store = tmp_path / "precision.json"
    (verdict,) = __import__("json").loads(store.read_text()).values()
    assert verdict["choice"] == choice
    if choice == "bf16":
        assert verdict["mean_cos"] >= AGREE_MEAN_COS and verdict["min_cos"] >= AGREE_MIN_COS
        assert verdict["speedup"] > 1.0
    # the verdict is stored: a second call does not probe again
    mtime = store.stat().st_mtime_ns
    assert resolve_precision("auto", lite0, photos, cache_root=tmp_path, batch_size=8) == choice
    assert store.stat().st_mtime_ns == mtime
    assert resolve_precision("fp16", lite0, photos, cache_root=tmp_path) == "fp16"
