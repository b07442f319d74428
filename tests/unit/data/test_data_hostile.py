"""The pull under hostile or awkward input: each bad file is one rejection with its reason,
names are safe for every sink, the pull is incremental without trusting a damaged copy, and
killed pulls leave nothing that lasts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from tests.unit.data.conftest import png
from transferlab.config import DataParams, FolderSource, ManifestSource
from transferlab.data import DataSourceError, pull_dataset, read_manifest
from transferlab.data.manifest import file_sha256
from transferlab.data.pull import dataset_problem, remove_stale_tmp


def _source(root: Path, classes=("cats", "dogs"), n=3) -> Path:
    for k, label in enumerate(classes):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / label / f"{i}.png").write_bytes(png((40, 40), seed=100 * k + i))
    return root


def _params(src: Path, **kw) -> DataParams:
    return DataParams(source=FolderSource(path=src), **kw)


def _rejected(out: Path) -> dict[str, str]:
    return {
        r["source"].rsplit("/", 1)[-1]: r["reason"]
        for r in json.loads((out / "rejected.json").read_text())
    }


def test_files_that_would_hurt_are_rejected_one_by_one(tmp_path):
    src = _source(tmp_path / "src")
    outside = tmp_path / "outside"
    _source(outside, classes=("secret",))
    os.symlink("/dev/zero", src / "cats" / "zero.png")
    os.symlink(outside / "secret" / "0.png", src / "cats" / "leak.png")
    os.symlink(outside / "secret", src / "linked")  # a class folder linked out of the source
    os.symlink(src / "dogs" / "0.png", src / "cats" / "inside.png")  # inside: followed
    os.mkfifo(src / "cats" / "fifo.png")
    with open(src / "cats" / "huge.jpg", "wb") as f:
        f.truncate(8 << 30)  # 8 GB, sparse: costs nothing on disk
    result = pull_dataset(_params(src), tmp_path / "out", workers=1)
    reasons = _rejected(tmp_path / "out")
    assert reasons["zero.png"].startswith("symlink out of the source folder")
    assert reasons["leak.png"].startswith("symlink out of the source folder")
    assert reasons["linked"].startswith("symlink out of the source folder")
    assert reasons["fifo.png"].startswith("not a regular file")
    assert reasons["huge.jpg"].startswith("too large: 8589934592 bytes > data.max_bytes")
    # the link inside the source is followed: its bytes are those of dogs/0.png, which then
    # comes second (sorted) and is the duplicate
    assert reasons["0.png"].startswith("duplicate: same bytes as images/cats/inside.png")
    assert result.kept == {"cats": 4, "dogs": 2}
    assert "secret" not in (tmp_path / "out" / "manifest.csv").read_text()


def test_labels_are_nfc_and_odd_characters_survive(tmp_path):
    nfd = unicodedata.normalize("NFD", "café")
    src = _source(tmp_path / "src", classes=(nfd, "cat's 🐱", "A&B (1)", "$(touch PWNED)"))
    pull_dataset(_params(src), tmp_path / "out", workers=1)
    labels = {r["label"] for r in read_manifest(tmp_path / "out" / "manifest.csv")}
    assert labels == {"café", "cat's 🐱", "A&B (1)", "$(touch PWNED)"}
    assert (tmp_path / "out" / "images" / "café").is_dir()
    assert not list(tmp_path.rglob("PWNED")) and not Path("PWNED").exists()


def test_a_file_name_no_sink_accepts_is_one_rejection(tmp_path):
    src = _source(tmp_path / "src")
    (src / "cats" / "bad\nname.png").write_bytes(png((40, 40), seed=7))
    result = pull_dataset(_params(src), tmp_path / "out", workers=1)
    assert "control character U+000A" in _rejected(tmp_path / "out")["bad%0Aname.png"]
    assert result.kept == {"cats": 3, "dogs": 3}


@pytest.mark.parametrize(
    ("path", "label", "match"),
    [
        ("x.png", "..", "label '..'"),
        ("../outside.png", "cats", "path '../outside.png'"),
        ("/etc/passwd", "cats", "absolute"),
    ],
)
def test_manifest_entries_that_leave_their_folder_are_refused(tmp_path, path, label, match):
    (tmp_path / "m.csv").write_text(f"path,label\n{path},{label}\n")
    with pytest.raises(DataSourceError, match=match):
        pull_dataset(DataParams(source=ManifestSource(path=tmp_path / "m.csv")), tmp_path / "o")


def test_manifest_path_through_a_linked_folder_is_rejected(tmp_path):
    base = _source(tmp_path / "base")
    _source(tmp_path / "outside", classes=("secret",))
    os.symlink(tmp_path / "outside", base / "via")
    rows = [f"cats/{i}.png,cats" for i in range(3)] + [f"dogs/{i}.png,dogs" for i in range(3)]
    (base / "m.csv").write_text("path,label\n" + "\n".join([*rows, "via/secret/0.png,cats"]))
    pull_dataset(DataParams(source=ManifestSource(path=base / "m.csv")), tmp_path / "o")
    assert _rejected(tmp_path / "o")["0.png"].startswith("symlink out of the source folder")


def test_banner_images_are_judged_by_pixel_count(tmp_path):
    src = _source(tmp_path / "src")
    (src / "cats" / "banner.png").write_bytes(png((400, 30), seed=9))
    (src / "cats" / "sliver.png").write_bytes(png((400, 2), seed=10))
    pull_dataset(_params(src, min_size=32), tmp_path / "out", workers=1)
    rows = {r["path"]: r for r in read_manifest(tmp_path / "out" / "manifest.csv")}
    assert (rows["images/cats/banner.png"]["width"], rows["images/cats/banner.png"]["height"]) == (
        400,
        30,
    )
    assert _rejected(tmp_path / "out")["sliver.png"].startswith("too small: 400x2 = 800 pixels")


def _inodes(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_ino for p in out.rglob("*.png")}


def test_second_pull_reuses_unchanged_files_and_checks_new_ones(tmp_path):
    src = _source(tmp_path / "src")
    out = tmp_path / "out"
    pull_dataset(_params(src), out, workers=1)
    first = _inodes(out)
    (src / "dogs" / "new.png").write_bytes(png((40, 40), seed=77))
    pull_dataset(_params(src), out, workers=1)
    second = _inodes(out)
    # unchanged files were linked, not rewritten: the same inodes
    assert {k: second[k] for k in first} == first
    assert "images/dogs/new.png" in second
    for row in read_manifest(out / "manifest.csv"):
        assert file_sha256(out / row["path"]) == row["sha256"]


def test_a_damaged_or_deleted_copy_is_rebuilt_from_the_source(tmp_path):
    src = _source(tmp_path / "src")
    out = tmp_path / "out"
    pull_dataset(_params(src), out, workers=1)
    victim = out / "images" / "cats" / "1.png"
    data = victim.read_bytes()
    victim.unlink()  # a new file with the same size and other bytes
    victim.write_bytes(bytes(len(data)))
    (out / "images" / "dogs" / "2.png").unlink()
    assert "missing" in dataset_problem(out)
    pull_dataset(_params(src), out, workers=1)
    assert victim.read_bytes() == data
    assert dataset_problem(out) is None
    for row in read_manifest(out / "manifest.csv"):
        assert file_sha256(out / row["path"]) == row["sha256"]


def test_a_changed_rule_checks_everything_again(tmp_path):
    src = _source(tmp_path / "src")
    out = tmp_path / "out"
    pull_dataset(_params(src), out, workers=1)
    with pytest.raises(DataSourceError, match="too small"):
        pull_dataset(_params(src, min_size=100), out, workers=1)


def test_stale_pull_folders_are_removed_and_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name, pid in (("dead", dead.pid), ("live", live.pid)):
            (out / f".pull-{name}").mkdir()
            (out / f".pull-{name}" / "owner.json").write_text(
                json.dumps({"pid": pid, "host": os.uname().nodename})
            )
        (out / ".pull-young-unowned").mkdir()
        os.symlink(tmp_path, out / ".pull-link")  # never followed, never removed
        removed = remove_stale_tmp(out)
    finally:
        live.kill()
        live.wait()
    assert [p.name for p in removed] == [".pull-dead"]
    assert sorted(p.name for p in out.iterdir()) == [
        ".pull-link",
        ".pull-live",
        ".pull-young-unowned",
    ]


def test_pull_does_not_import_torch(tmp_path):
    src = _source(tmp_path / "src")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from transferlab.config import Params\n"
        "from transferlab.stages import STAGES\n"
        f"source = {{'kind': 'folder', 'path': {str(src)!r}}}\n"
        "p = Params.model_validate({'data': {'source': source}})\n"
        f"STAGES['pull'].run(p, Path({str(tmp_path)!r}))\n"
        "assert 'torch' not in sys.modules, 'pull imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert (tmp_path / "data" / "manifest.csv").is_file()


def _damage_fields(text: str) -> str:
    """Every entry's fields replaced by ones of the wrong kind, under the right header."""
    header, *lines = text.split("\n")
    return "\n".join([header] + [line.split("\t")[0] + "\tx\t\t3\tw\t[]\t5\t{}" for line in lines])


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: "not an index",
        lambda text: "\ufffd" + text,  # another header
        lambda text: text.encode("utf-8") + b"\xff\xfe",  # not UTF-8
        lambda text: text.replace("\t", " "),  # lines without fields
        _damage_fields,
    ],
)
def test_a_damaged_index_only_costs_a_full_check(tmp_path, damage):
    src = _source(tmp_path / "src")
    out = tmp_path / "out"
    pull_dataset(_params(src), out, workers=1)
    manifest = (out / "manifest.csv").read_bytes()
    index = out / "pull-index.tsv"
    damaged = damage(index.read_text(encoding="utf-8"))
    index.write_bytes(damaged if isinstance(damaged, bytes) else damaged.encode("utf-8"))
    pull_dataset(_params(src), out, workers=1)
    assert (out / "manifest.csv").read_bytes() == manifest
    assert dataset_problem(out) is None
    assert (out / "pull-index.tsv").read_text(encoding="utf-8").count("\n") == 6  # rebuilt


def test_the_index_is_trusted_only_for_unchanged_files(tmp_path):
    """A second pull reads no unchanged file: proven by an index that lies about two files'
    widths (a full check would correct them). A changed source file is read again."""
    src = _source(tmp_path / "src")
    out = tmp_path / "out"
    pull_dataset(_params(src), out, workers=1)
    index = out / "pull-index.tsv"
    lines = index.read_text(encoding="utf-8").split("\n")
    for k, line in enumerate(lines[1:], start=1):
        fields = line.split("\t")
        if fields[0].startswith(("cats/0.png|", "cats/1.png|")):
            fields[4] = "41"  # width
            lines[k] = "\t".join(fields)
    index.write_text("\n".join(lines), encoding="utf-8")
    (src / "cats" / "1.png").write_bytes(png((40, 40), seed=55))
    pull_dataset(_params(src), out, workers=1)
    widths = {row["path"]: row["width"] for row in read_manifest(out / "manifest.csv")}
    assert widths["images/cats/0.png"] == 41  # unchanged: not read
    assert widths["images/cats/1.png"] == 40  # changed: read and decoded again


def test_an_edited_copy_is_read_again(tmp_path):
    """A copy under images/ changed in place (same inode, same size) is not trusted."""
    src = _source(tmp_path / "src")
    out = tmp_path / "out"
    pull_dataset(_params(src), out, workers=1)
    copy = out / "images" / "dogs" / "1.png"
    good = copy.read_bytes()
    with open(copy, "r+b") as f:
        f.write(bytes(len(good)))
    pull_dataset(_params(src), out, workers=1)
    assert copy.read_bytes() == good
    assert dataset_problem(out) is None


def test_files_left_in_images_by_a_killed_pull_are_replaced_or_removed(tmp_path):
    """A killed pull may leave copies of new files under images/ (they go there before the
    manifest names them): the next pull neither trusts nor keeps them."""
    src = _source(tmp_path / "src")
    out = tmp_path / "out"
    pull_dataset(_params(src), out, workers=1)
    (src / "dogs" / "new.png").write_bytes(png((40, 40), seed=77))
    (out / "images" / "dogs" / "new.png").write_bytes(b"half a copy")
    (out / "images" / "dogs" / "gone.png").write_bytes(b"a file the source no longer has")
    (out / "images" / "birds").mkdir()
    (out / "images" / "birds" / "x.png").write_bytes(b"a class the source does not have")
    assert "not in" in dataset_problem(out)
    pull_dataset(_params(src), out, workers=1)
    assert (out / "images/dogs/new.png").read_bytes() == (src / "dogs/new.png").read_bytes()
    assert not (out / "images" / "birds").exists()
    assert dataset_problem(out) is None
    # and when only unlisted files are left (no new file to copy): the same
    (out / "images" / "dogs" / "gone.png").write_bytes(b"stray")
    pull_dataset(_params(src), out, workers=1)
    assert dataset_problem(out) is None


def test_an_index_from_an_older_version_is_removed(tmp_path):
    src = _source(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "pull-index.json").write_text("{}")
    pull_dataset(_params(src), out, workers=1)
    assert not (out / "pull-index.json").exists()
    assert (out / "pull-index.tsv").is_file()
