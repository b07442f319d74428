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


@pytest.mark.parametrize("size", [(28, 28), (100, 37), (37, 100), (513, 300)])
def test_loader_pixels_equal_the_plain_rgb_transform(tmp_path, tiny_backbone, size):
    """Workers hand over uint8 and resize grayscale as one channel: same pixels as the plain
    PIL-RGB -> float transform, for gray and colour files alike."""
    import torch
    from PIL import Image

    from transferlab.backbones import preprocess_transform
    from transferlab.data import open_rgb
    from transferlab.features import load_images

    rng = np.random.default_rng(sum(size))
    gray, rgb = tmp_path / "g.png", tmp_path / "c.png"
    Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8), "L").save(gray)
    Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8), "RGB").save(rgb)
    spec = tiny_backbone.spec
    expected = torch.stack([preprocess_transform(spec)(open_rgb(p)) for p in (gray, rgb)])
    assert torch.equal(load_images([gray, rgb], spec), expected)
    feats, _ = extract_features(
        tiny_backbone,
        [gray, rgb],
        [file_sha256(gray), file_sha256(rgb)],
        cache_root=tmp_path / "cache",
        num_workers=1,
    )
    with torch.inference_mode():
        direct = tiny_backbone.features(expected).numpy()
    np.testing.assert_allclose(feats, direct, rtol=1e-5, atol=1e-5)
