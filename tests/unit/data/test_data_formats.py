"""Manifest files, IDX (real Fashion-MNIST), torchvision datasets, the fashion_mnist preset."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.unit.data.conftest import png
from transferlab.config import (
    FASHION_MNIST_CLASSES,
    DataParams,
    FashionMnistSource,
    IdxSource,
    ManifestSource,
    TorchvisionSource,
)
from transferlab.data import DataSourceError, pull_dataset, read_manifest
from transferlab.data.idx import IdxError, read_idx
from transferlab.data.sources import list_source

# Debian's dataset-fashion-mnist; CI installs it (.ci/run).
FASHION = Path("/usr/share/datasets/fashion-mnist")
FIRST_TRAIN_LABELS = [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
FIRST_TEST_LABELS = [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]


# ---------------------------------------------------------------- manifest files


def _images(tmp_path: Path) -> None:
    for i, rel in enumerate(["a/cat1.png", "a/cat2.png", "b/dog 1.png", "b/dog2.png"]):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(png(seed=i))


def test_csv_manifest_paths_are_relative_to_it(tmp_path: Path) -> None:
    _images(tmp_path)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "all.csv").write_text(
        "path,label\n../a/cat1.png,cat\n../a/cat2.png,cat\n../b/dog 1.png,dog\n"
        "../b/dog2.png,dog\n../b/missing.png,dog\n",
        encoding="utf-8",
    )
    with pytest.raises(DataSourceError, match="stay inside"):
        list_source(ManifestSource(path=lists / "all.csv"))
    (tmp_path / "all.csv").write_text(
        "path,label\na/cat1.png,cat\na/cat2.png,cat\nb/dog 1.png,dog\nb/dog2.png,dog\n"
        "b/missing.png,dog\n",
        encoding="utf-8",
    )
    result = pull_dataset(
        DataParams(source=ManifestSource(path=tmp_path / "all.csv")), tmp_path / "out"
    )
    assert result.kept == {"cat": 2, "dog": 2}
    assert result.n_rejected == 1  # the missing file, with its reason
    rejected = json.loads(result.rejected.read_text())
    assert rejected[0]["reason"].startswith("unreadable")
    rows = read_manifest(result.manifest)
    assert {r["path"] for r in rows} == {
        "images/cat/a/cat1.png",
        "images/cat/a/cat2.png",
        "images/dog/b/dog 1.png",
        "images/dog/b/dog2.png",
    }


def test_json_manifest(tmp_path: Path) -> None:
    _images(tmp_path)
    entries = [
        {"path": "a/cat1.png", "label": "chat noir"},
        {"path": "a/cat2.png", "label": "chat noir"},
        {"path": "b/dog2.png", "label": "Hund"},
    ]
    (tmp_path / "m.json").write_text(json.dumps(entries), encoding="utf-8")
    files, classes = list_source(ManifestSource(path=tmp_path / "m.json"))
    assert classes == ["Hund", "chat noir"]
    assert [(f.label, f.rel.as_posix()) for f in files] == [
        ("Hund", "b/dog2.png"),
        ("chat noir", "a/cat1.png"),
        ("chat noir", "a/cat2.png"),
    ]
    assert all(f.path.is_file() for f in files)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("file,class\nx.png,a\n", "needs path and label"),
        ("path,label\n/etc/passwd,a\n", "stay inside"),
        ("path,label\nx.png,\n", "labels non-empty"),
    ],
)
def test_bad_manifest_is_a_clear_error(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "m.csv").write_text(text, encoding="utf-8")
    with pytest.raises(DataSourceError, match=match):
        list_source(ManifestSource(path=tmp_path / "m.csv"))


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="not found"):
        pull_dataset(DataParams(source=ManifestSource(path=tmp_path / "x.csv")), tmp_path / "o")


# ---------------------------------------------------------------- IDX


def test_idx_reader_on_real_fashion_mnist() -> None:
    train_x = read_idx(FASHION / "train-images-idx3-ubyte.gz")
    train_y = read_idx(FASHION / "train-labels-idx1-ubyte.gz")
    test_x = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")
    test_y = read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    assert train_x.shape == (60000, 28, 28) and train_x.dtype == np.uint8
    assert test_x.shape == (10000, 28, 28)
    assert train_y.shape == (60000,) and test_y.shape == (10000,)
    assert train_y[:10].tolist() == FIRST_TRAIN_LABELS
    assert test_y[:10].tolist() == FIRST_TEST_LABELS
    assert np.bincount(train_y).tolist() == [6000] * 10
    assert np.bincount(test_y).tolist() == [1000] * 10
    assert train_x.max() == 255 and train_x.min() == 0


def test_idx_reader_raw_and_broken(tmp_path: Path) -> None:
    raw = gzip.decompress((FASHION / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "labels").write_bytes(raw)
    assert read_idx(tmp_path / "labels")[:10].tolist() == FIRST_TEST_LABELS
    (tmp_path / "short").write_bytes(raw[:-1])
    with pytest.raises(IdxError, match="header says"):
        read_idx(tmp_path / "short")
    (tmp_path / "html").write_bytes(b"<html>not found</html>")
    with pytest.raises(IdxError, match="not an IDX file"):
        read_idx(tmp_path / "html")


def test_fashion_mnist_preset_with_a_per_class_cap(tmp_path: Path) -> None:
    source = FashionMnistSource(per_class=3)
    result = pull_dataset(DataParams(source=source, min_size=28), tmp_path / "out")
    assert result.kept == {c: 3 for c in FASHION_MNIST_CLASSES}
    rows = read_manifest(result.manifest)
    # The cap takes the first images by index, all from train (6,000 per class there).
    ankle = sorted((r for r in rows if r["label"] == "Ankle boot"), key=lambda r: r["path"])
    assert [r["path"] for r in ankle][0] == "images/Ankle boot/train-00000.png"
    first = read_idx(FASHION / "train-images-idx3-ubyte.gz")[0]
    png_pixels = np.asarray(Image.open(tmp_path / "out" / ankle[0]["path"]))
    assert np.array_equal(png_pixels, first)
    assert ankle[0]["source"] == (FASHION / "train-images-idx3-ubyte.gz").as_uri() + "#0"
    assert {(r["width"], r["height"]) for r in rows} == {(28, 28)}


def test_idx_source_digit_labels_and_one_split(tmp_path: Path) -> None:
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(FASHION / name, tmp_path / name)
    source = IdxSource(path=tmp_path, splits=("t10k",), per_class=2)
    result = pull_dataset(DataParams(source=source, min_size=28), tmp_path / "out")
    assert result.kept == {str(d): 2 for d in range(10)}


def test_mnist_sized_images_under_min_size_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="too small.*lower data.min_size"):
        pull_dataset(DataParams(source=FashionMnistSource(per_class=1)), tmp_path / "out")


# ---------------------------------------------------------------- torchvision


@pytest.fixture(scope="module")
def torchvision_cache(tmp_path_factory) -> Path:
    """Fashion-MNIST in torchvision's own layout (root/FashionMNIST/raw/...), made offline."""
    root = tmp_path_factory.mktemp("tv")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in FASHION.glob("*-ubyte.gz"):
        (raw / gz.name.removesuffix(".gz")).write_bytes(gzip.decompress(gz.read_bytes()))
    return root


def test_torchvision_dataset_becomes_the_same_manifest(torchvision_cache, tmp_path) -> None:
    source = TorchvisionSource(
        name="FashionMNIST", path=torchvision_cache, split="test", download=False, per_class=2
    )
    result = pull_dataset(DataParams(source=source, min_size=28), tmp_path / "out")
    # torchvision's own class names, the slash of "T-shirt/top" made safe for a folder
    assert result.kept == {c: 2 for c in FASHION_MNIST_CLASSES}
    rows = read_manifest(result.manifest)
    assert {r["source"].split("#")[0] for r in rows} == {"torchvision://FashionMNIST/test"}
    test_x = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")
    for r in rows:
        index = int(r["source"].split("#")[1])
        pixels = np.asarray(Image.open(tmp_path / "out" / r["path"]))
        assert np.array_equal(pixels, test_x[index])


def test_torchvision_missing_files_without_download(tmp_path: Path) -> None:
    source = TorchvisionSource(name="MNIST", path=tmp_path / "empty", download=False)
    with pytest.raises(DataSourceError, match="download: true"):
        pull_dataset(DataParams(source=source, min_size=28), tmp_path / "out")


def test_fashion_mnist_falls_back_to_torchvision(torchvision_cache, tmp_path) -> None:
    # The Debian folder is absent; the torchvision cache already holds the files, so its
    # downloader finds them and fetches nothing.
    source = FashionMnistSource(
        path=tmp_path / "not-installed", cache=torchvision_cache, splits=("t10k",), per_class=1
    )
    result = pull_dataset(DataParams(source=source, min_size=28), tmp_path / "out")
    assert result.kept == {c: 1 for c in FASHION_MNIST_CLASSES}


def test_unknown_torchvision_name_fails_at_config_time() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        TorchvisionSource(name="ImageNet")


def test_unknown_source_key_lists_the_keys_of_that_kind(tmp_path: Path) -> None:
    from transferlab.config import ParamsError, load_params

    p = tmp_path / "params.yaml"
    p.write_text("data:\n  source: {kind: s3, url: 's3://b/p', endpont_url: x}\n")
    with pytest.raises(
        ParamsError, match="endpont_url.*allowed keys here: kind, url, endpoint_url"
    ):
        load_params(p)


def test_torchvision_split_name_is_checked(tmp_path: Path) -> None:
    source = TorchvisionSource(name="MNIST", path=tmp_path, split="val", download=False)
    with pytest.raises(DataSourceError, match="train and test"):
        list_source(source, tmp_path / "scratch")
    source = TorchvisionSource(name="DTD", path=tmp_path, split="nope", download=False)
    with pytest.raises(DataSourceError, match="data.source.split"):
        list_source(source, tmp_path / "scratch")
