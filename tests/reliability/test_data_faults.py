"""Broken data: each bad file is rejected with its reason, the good ones carry on; split and
source errors name the class and the fix and leave earlier outputs as they were."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from PIL import Image

from tests.conftest import draw_image, tiny_params, write_workspace
from tests.reliability.cases import Case
from tests.reliability.conftest import cli, error_lines, tree_digest


def _png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_image("circles", seed=seed, size=64).save(path)


def _truncated(path):
    _png(path.with_suffix(".png"), 1)
    data = path.with_suffix(".png").read_bytes()
    path.with_suffix(".png").unlink()
    path.write_bytes(data[: len(data) // 2])


def _bomb(path):
    # a valid PNG header claiming 30000 x 30000 pixels: over max_pixels
    Image.new("1", (30000, 30000)).save(path)


BAD_FILES = [
    Case("data-truncated", "half a PNG", "rejected as truncated", "the other images").param(
        "bad.png", _truncated, "truncated"
    ),
    Case("data-zero-byte", "an empty .jpg", "rejected as empty", "the other images").param(
        "bad.jpg", lambda p: p.write_bytes(b""), "empty"
    ),
    Case(
        "data-html-as-jpg",
        "an HTML error page saved as .jpg",
        "rejected: not an image",
        "the other images",
    ).param("bad.jpg", lambda p: p.write_text("<html><body>404</body></html>"), "not an image"),
    Case(
        "data-decompression-bomb",
        "a 900-megapixel PNG",
        "rejected before decoding",
        "the other images",
    ).param("bad.png", _bomb, "too many pixels"),
]


def _dataset(root, per_class=4, classes=("circles", "squares")):
    for c, name in enumerate(classes):
        for i in range(per_class):
            _png(root / name / f"{i}.png", seed=10 * c + i)
    return root


@pytest.mark.parametrize(("case", "name", "make", "reason"), BAD_FILES)
def test_a_bad_file_is_rejected_and_the_rest_kept(case, name, make, reason, tmp_path):
    src = _dataset(tmp_path / "src")
    make(src / "circles" / name)
    ws = write_workspace(
        tmp_path / "ws", tiny_params(src, data={"max_pixels": 50_000_000, "min_size": 16})
    )
    proc = cli("pull", cwd=ws)
    assert proc.returncode == 0, proc.stderr
    rejected = json.loads((ws / "data/rejected.json").read_text())
    assert len(rejected) == 1 and reason in rejected[0]["reason"], rejected
    assert len((ws / "data/manifest.csv").read_text().splitlines()) == 1 + 8


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "data-empty-class",
            "a class folder without images",
            "pull warns naming the class",
            "the other classes' images",
        ).param()
    ],
)
def test_empty_class_is_reported(case, tmp_path):
    src = _dataset(tmp_path / "src", classes=("circles", "squares", "stripes"))
    shutil.rmtree(src / "stripes")
    (src / "stripes").mkdir()
    ws = write_workspace(tmp_path / "ws", tiny_params(src))
    proc = cli("pull", cwd=ws)
    assert proc.returncode == 0, proc.stderr
    assert "stripes" in proc.stderr and "no usable image" in proc.stderr


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "data-class-too-small-for-split",
            "a class with 1 image, split needs 3",
            "exit 1 naming the class and the fix",
            "the previous data/split.csv",
        ).param()
    ],
)
def test_class_too_small_for_split(case, workspace_copy):
    before = tree_digest(workspace_copy, skip=("params.yaml", ".transferlab/lock"))
    params = yaml.safe_load((workspace_copy / "params.yaml").read_text())
    params["split"] = {"seed": 0, "val": 0.2, "test": 0.25, "per_class": 1}
    (workspace_copy / "params.yaml").write_text(yaml.safe_dump(params))
    proc = cli("split", cwd=workspace_copy)
    assert proc.returncode == 1
    (line,) = error_lines(proc.stderr)
    assert "circles" in line and ("split.val" in line or "add images" in line), line
    assert tree_digest(workspace_copy, skip=("params.yaml", ".transferlab/lock")) == before


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "data-one-class",
            "a dataset with a single class",
            "exit 1: needs 2 classes",
            "no data/ written",
        ).param()
    ],
)
def test_single_class_dataset(case, tmp_path):
    src = _dataset(tmp_path / "src", classes=("circles",))
    ws = write_workspace(tmp_path / "ws", tiny_params(src))
    proc = cli("pull", cwd=ws)
    assert proc.returncode == 1
    (line,) = error_lines(proc.stderr)
    assert "class" in line and "circles" in line
    assert not (ws / "data/manifest.csv").exists()
