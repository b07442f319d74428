from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from transferlab.config import DataParams, FolderSource, TuxpaintSource
from transferlab.data import (
    DataSourceError,
    file_sha256,
    manifest_hash,
    pull_dataset,
    read_manifest,
)
from transferlab.data.sources import list_source

TUXPAINT_ROOT = Path("/usr/share/tuxpaint/stamps")


def test_folder_listing_ignores_junk(messy) -> None:
    files, classes = list_source(FolderSource(path=messy.root))
    listed = {f"{f.label}/{f.rel}" for f in files}
    assert listed == set(messy.kept) | set(messy.rejected)
    assert classes == sorted(["cats", messy.odd_class, "empty class"])
    assert files == sorted(files, key=lambda f: (f.label, f.rel.as_posix()))
    assert all(f.path.is_absolute() for f in files)


def test_tuxpaint_preset_on_the_real_stamps(tmp_path: Path) -> None:
    # Debian's tuxpaint-stamps-default; CI installs it (apt-get install
    # --no-install-recommends tuxpaint-stamps-default).
    result = pull_dataset(DataParams(), tmp_path / "out")
    rows = read_manifest(result.manifest)
    assert set(result.kept) == {"mammals", "birds", "fruit_vegetables", "flowers", "fish"}
    assert all(n >= 10 for n in result.kept.values()), result.kept
    assert not [r for r in rows if "_mirror" in r["path"] or "_flip" in r["path"]]
    assert not [r for r in rows if "/cartoon/" in r["path"]]
    assert all(r["source"].startswith(TUXPAINT_ROOT.as_uri()) for r in rows)
    # both listed subfolders feed the merged class
    fv = {r["path"].split("/")[3] for r in rows if r["label"] == "fruit_vegetables"}
    assert fv == {"fruit", "vegetables"}


def test_tuxpaint_listing_skips_mirrored_and_flipped(tmp_path: Path, gen) -> None:
    root = tmp_path / "stamps"
    for rel in ("a/x.png", "a/x_mirror.png", "a/y_flip.jpg", "a/deep/z.jpg", "a/z.svg", "b/w.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(gen.png())
    files, classes = list_source(TuxpaintSource(path=root, classes={"one": ("a",), "two": ("b",)}))
    assert [f"{f.label}:{f.rel}" for f in files] == [
        "one:a/deep/z.jpg",
        "one:a/x.png",
        "two:b/w.png",
    ]
    assert classes == ["one", "two"]


def test_missing_tuxpaint_root_says_what_to_do(tmp_path: Path) -> None:
    params = DataParams(source=TuxpaintSource(path=tmp_path / "no-stamps"))
    with pytest.raises(DataSourceError) as info:
        pull_dataset(params, tmp_path / "out")
    msg = str(info.value)
    assert "\n" not in msg
    assert str(tmp_path / "no-stamps") in msg
    assert "apt-get install --no-install-recommends tuxpaint-stamps-default" in msg
    assert "{kind: folder, path: ...}" in msg


def test_missing_tuxpaint_class_folder(tmp_path: Path) -> None:
    (tmp_path / "stamps" / "a").mkdir(parents=True)
    source = TuxpaintSource(path=tmp_path / "stamps", classes={"one": ("a",), "two": ("nope",)})
    with pytest.raises(DataSourceError, match=r"class 'two': folder .*nope not found"):
        list_source(source)


def test_hashes(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 5000  # spans several read chunks
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert manifest_hash(path) == file_sha256(path)


def test_read_manifest_types(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text(
        "path,label,sha256,width,height,source\nimages/a/1.jpg,a,abc,64,48,file:///x/1.jpg\n",
        encoding="utf-8",
    )
    assert read_manifest(path) == [
        {
            "path": "images/a/1.jpg",
            "label": "a",
            "sha256": "abc",
            "width": 64,
            "height": 48,
            "source": "file:///x/1.jpg",
        }
    ]
