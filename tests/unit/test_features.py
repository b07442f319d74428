import numpy as np
import pytest

from transferlab.backbones import load_backbone
from transferlab.data import file_sha256
from transferlab.features import FeatureCache, extract_features, key_space


@pytest.fixture(scope="module")
def tiny_backbone():
    # random weights: the cache logic does not depend on them
    return load_backbone("torchvision:resnet18", "none")


def _files(tiny_dataset):
    paths = sorted(tiny_dataset.rglob("*.png"))
    return paths, [file_sha256(p) for p in paths]


def test_cache_misses_then_hits_and_grows_incrementally(tmp_path, tiny_dataset, tiny_backbone):
    paths, shas = _files(tiny_dataset)
    first, stats = extract_features(tiny_backbone, paths[:20], shas[:20], cache_root=tmp_path)
    assert (stats.hits, stats.misses) == (0, 20)
    again, stats = extract_features(tiny_backbone, paths[:20], shas[:20], cache_root=tmp_path)
    assert (stats.hits, stats.misses) == (20, 0)
    np.testing.assert_array_equal(first, again)
    grown, stats = extract_features(tiny_backbone, paths, shas, cache_root=tmp_path)
    assert (stats.hits, stats.misses) == (20, len(paths) - 20)
    np.testing.assert_allclose(grown[:20], first, rtol=1e-5, atol=1e-5)


def test_other_preprocessing_or_dtype_is_another_key_space(tiny_backbone):
    a = key_space(tiny_backbone, background=(255, 255, 255), precision="fp32")
    assert a != key_space(tiny_backbone, background=(0, 0, 0), precision="fp32")
    assert a != key_space(tiny_backbone, background=(255, 255, 255), precision="bf16")


def test_shards_are_written_atomically_and_reloaded(tmp_path):
    cache = FeatureCache(tmp_path, "space")
    cache.put(["a", "b"], np.ones((2, 4), np.float32))
    assert not list(tmp_path.rglob("*.tmp"))
    fresh = FeatureCache(tmp_path, "space")
    fresh.refresh()
    assert "a" in fresh and "c" not in fresh
    np.testing.assert_array_equal(fresh.get(["b", "a"]), np.ones((2, 4)))
