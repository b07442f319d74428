from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from transferlab.config import DataParams, FolderSource
from transferlab.data import (
    DataSourceError,
    file_sha256,
    manifest_hash,
    pull_dataset,
    read_manifest,
)
from transferlab.data import pull as pull_mod
from transferlab.data.manifest import MANIFEST_COLUMNS


def _params(root: Path) -> DataParams:
    return DataParams(source=FolderSource(path=root))


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _outputs(out: Path) -> dict[str, bytes]:
    """Everything the stage owns in ``out``, to compare before and after a failed run."""
    state = {f"images/{k}": v for k, v in _tree(out / "images").items()}
    state["manifest.csv"] = (out / "manifest.csv").read_bytes()
    state["rejected.json"] = (out / "rejected.json").read_bytes()
    return state


def _no_temp_left(out: Path) -> bool:
    return not [p for p in out.iterdir() if p.name.startswith(".")]


def test_messy_folder_file_by_file(messy, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = pull_dataset(messy.params(), out, workers=1)

    rows = read_manifest(result.manifest)
    by_source = {r["source"]: r for r in rows}
    for rel, (label, w, h) in messy.kept.items():
        src = messy.root / rel
        row = by_source.pop(src.resolve().as_uri())
        inner = rel.split("/", 1)[1]
        assert row["label"] == label
        assert row["path"] == f"images/{label}/{inner}"
        assert (row["width"], row["height"]) == (w, h), rel
        # original bytes, not a re-encode
        assert (out / row["path"]).read_bytes() == src.read_bytes()
        assert row["sha256"] == file_sha256(src)
    assert by_source == {}, "kept files that should not be"

    rejected = {r["source"]: r["reason"] for r in json.loads(result.rejected.read_text("utf-8"))}
    for rel, reason in messy.rejected.items():
        got = rejected.pop((messy.root / rel).resolve().as_uri())
        assert got.startswith(reason), (rel, got)
    assert rejected == {}, "rejected files that should have been ignored"

    assert result.kept == {"cats": 10, messy.odd_class: 2}
    assert result.n_rejected == len(messy.rejected)
    assert result.manifest == out / "manifest.csv"
    assert result.rejected == out / "rejected.json"
    # nothing but accepted files was copied
    assert sorted(_tree(out / "images")) == sorted(r["path"][len("images/") :] for r in rows)
    assert _no_temp_left(out)


def test_manifest_format(messy, tmp_path: Path) -> None:
    result = pull_dataset(messy.params(), tmp_path / "out")
    text = result.manifest.read_bytes().decode("utf-8")
    lines = text.split("\n")
    assert lines[0] == ",".join(MANIFEST_COLUMNS)
    assert text.endswith("\n") and "\r" not in text
    rows = read_manifest(result.manifest)
    assert rows == sorted(rows, key=lambda r: (r["label"], r["path"]))
    assert all(r["source"].startswith("file:///") for r in rows)
    assert manifest_hash(result.manifest) == file_sha256(result.manifest)


def test_rerun_is_byte_identical(messy, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = pull_dataset(messy.params(), out, workers=1)
    before = _outputs(out)
    digest = manifest_hash(first.manifest)
    pull_dataset(messy.params(), out, workers=2)  # across processes: same bytes, same order
    assert _outputs(out) == before
    assert manifest_hash(first.manifest) == digest
    # and a fresh folder gives the same bytes too
    other = pull_dataset(messy.params(), tmp_path / "elsewhere")
    assert other.manifest.read_bytes() == before["manifest.csv"]


def test_rerun_reflects_source_changes(messy, tmp_path: Path, gen) -> None:
    out = tmp_path / "out"
    pull_dataset(messy.params(), out)
    (messy.root / "cats" / "good.png").unlink()
    messy.add("dogs/rex.jpg", gen.jpeg(seed=99))
    result = pull_dataset(messy.params(), out)
    assert result.kept == {"cats": 9, messy.odd_class: 2, "dogs": 1}
    assert not (out / "images/cats/good.png").exists()
    assert (out / "images/dogs/rex.jpg").is_file()


def test_failure_while_building_keeps_previous_outputs(
    messy, tmp_path: Path, gen, monkeypatch
) -> None:
    out = tmp_path / "out"
    pull_dataset(messy.params(), out)
    before = _outputs(out)
    messy.add("dogs/rex.jpg", gen.jpeg(seed=99))

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pull_mod, "_write_manifest", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        pull_dataset(messy.params(), out, workers=1)
    assert _outputs(out) == before
    assert _no_temp_left(out)


@pytest.mark.parametrize("fail_on", ["images", "rejected.json", "manifest.csv"])
@pytest.mark.parametrize("change", ["add", "edit"])
def test_failure_while_swapping_restores_previous_outputs(
    messy, tmp_path: Path, gen, monkeypatch, fail_on: str, change: str
) -> None:
    """Added files are copied straight into images/ (under names the dataset does not use);
    an edited one makes the pull build the dataset beside the old one and swap it in."""
    out = tmp_path / "out"
    pull_dataset(messy.params(), out)
    before = _outputs(out)
    (messy.root / "cats" / "good.png").unlink()
    messy.add("dogs/rex.jpg", gen.jpeg(seed=99))
    messy.add("dogs/rex2.jpg", gen.jpeg(seed=98))
    if change == "edit":
        edited = next(p for p in (messy.root / "cats").iterdir() if p.suffix == ".png")
        assert f"images/cats/{edited.name}" in before
        edited.write_bytes(gen.png((40, 40), seed=97))

    if fail_on == "images" and change == "add":
        real_write = pull_mod._write
        writes = []

        def flaky_write(path, data):
            # the second new file: the first is already in images/
            writes.append(path)
            if len(writes) == 2:
                raise OSError("simulated crash")
            real_write(path, data)

        monkeypatch.setattr(pull_mod, "_write", flaky_write)
    else:
        real_replace = os.replace

        def flaky_replace(src, dst, *args, **kwargs):
            # Fail when the new version is being put in place, after earlier moves succeeded.
            if Path(dst).is_relative_to(out / fail_on) and "/new/" in str(src):
                raise OSError("simulated crash")
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(pull_mod.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="simulated crash"):
        pull_dataset(messy.params(), out, workers=1)
    monkeypatch.undo()
    assert _outputs(out) == before
    assert _no_temp_left(out)
    assert pull_mod.dataset_problem(out) is None
    # and the next pull gets there
    pull_dataset(messy.params(), out, workers=1)
    assert "images/dogs/rex2.jpg" in _outputs(out)
    assert pull_mod.dataset_problem(out) is None


def test_failed_first_run_leaves_nothing(messy, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    real_replace = os.replace

    def flaky_replace(src, dst, *args, **kwargs):
        if Path(dst) == out / "manifest.csv" and "/new/" in str(src):
            raise OSError("simulated crash")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(pull_mod.os, "replace", flaky_replace)
    with pytest.raises(OSError):
        pull_dataset(messy.params(), out, workers=1)
    assert list(out.iterdir()) == []


def test_summary_is_logged(messy, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="transferlab.data"):
        pull_dataset(messy.params(), tmp_path / "out")
    text = caplog.text
    assert "kept 12 image(s), rejected 6" in text
    assert "rejected as too small: 1" in text
    assert "rejected as duplicate: 1" in text
    assert messy.odd_class in text


def test_missing_source_folder(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="does not exist"):
        pull_dataset(_params(tmp_path / "nope"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_source_without_images(tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "notes.txt").write_text("no images here")
    (root / "top.jpg").write_bytes(b"ignored: not in a class folder")
    with pytest.raises(DataSourceError, match=r"no images found under .*class folders: cats"):
        pull_dataset(_params(root), tmp_path / "out")


def test_one_class_is_not_enough(tmp_path: Path, gen) -> None:
    root = tmp_path / "src"
    for i in range(3):
        (root / "cats").mkdir(parents=True, exist_ok=True)
        (root / "cats" / f"{i}.jpg").write_bytes(gen.jpeg(seed=i))
    (root / "dogs").mkdir()
    (root / "dogs" / "tiny.png").write_bytes(gen.png((8, 8)))
    (root / "birds").mkdir()
    with pytest.raises(DataSourceError) as info:
        pull_dataset(_params(root), tmp_path / "out")
    msg = str(info.value)
    assert "\n" not in msg
    assert "cats: 3 of 3 usable" in msg
    assert "dogs: 0 of 1 usable" in msg
    assert "birds: no image files" in msg
    assert "too small (1)" in msg
    assert "at least 2" in msg and "add a subfolder" in msg


def test_output_inside_source_is_refused(messy) -> None:
    with pytest.raises(DataSourceError, match="inside data.source.path"):
        pull_dataset(messy.params(), messy.root / "out")


def test_empty_and_small_classes_are_named_with_what_to_do(messy, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="transferlab.data"):
        result = pull_dataset(messy.params(), tmp_path / "out", min_per_class=10)
    assert result.empty == ("empty class",)
    assert result.small == {c: n for c, n in result.kept.items() if n < 10}
    assert result.small == {messy.odd_class: 2}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("'empty class' has no usable image" in w for w in warnings) == 1
    assert any(
        "too few usable images for the split" in w and "lower split.val/split.test" in w
        for w in warnings
    )
    # Enough per class: no warning about sizes.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="transferlab.data"):
        again = pull_dataset(messy.params(), tmp_path / "out2", min_per_class=1)
    assert again.small == {}
    assert not any("too few" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "label, uri",
    [
        ("cats", "file:///data/cats/a.png"),
        ("a,b", "file:///data/a%2Cb/x.png"),
        ('say "cheese"', 's3://bucket/say "cheese"/x.png'),
        ("cats", "https://example.org/a.tar.gz#cats/x,y.png"),
        ("cr\rlf\n", "file:///x"),
        ("Crème brûlée", "file:///data/Cr%C3%A8me/x.png"),
    ],
)
def test_manifest_rows_are_what_csv_writes(label, uri) -> None:
    import csv
    import io

    path = f"images/{label}/x.png"
    verdict = pull_mod.Verdict(sha256="ab" * 32, width=40, height=30, uri=uri)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow((path, label, "ab" * 32, 40, 30, uri))
    assert pull_mod._manifest_line(path, label, verdict) == buf.getvalue()
