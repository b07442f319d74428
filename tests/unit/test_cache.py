"""The feature cache on disk: digest-named shards, verify/gc/info, concurrent writers, SIGKILL."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import REPO
from transferlab import cache
from transferlab.cache import FeatureCache
from transferlab.cli import app
from transferlab.data import file_sha256


def sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def feats_for(ids: list[int], dim: int = 8) -> np.ndarray:
    # a pure function of the image id, so every writer produces the same row for one image
    return np.stack([np.random.default_rng(i).standard_normal(dim) for i in ids]).astype(np.float32)


def fill(root: Path, space: str, ids: list[int]) -> Path:
    return FeatureCache(root, space).put([sha(i) for i in ids], feats_for(ids))


def test_shard_name_is_the_digest_of_its_bytes_and_put_is_idempotent(tmp_path):
    shard = fill(tmp_path, "s", [1, 2, 3])
    assert shard.name == f"shard-{file_sha256(shard)}.npz"
    assert fill(tmp_path, "s", [1, 2, 3]) == shard
    assert len(cache.shards(tmp_path / "s")) == 1
    assert not list(tmp_path.rglob("*.tmp"))


def test_verify_finds_and_repairs_a_corrupt_shard(tmp_path):
    good = fill(tmp_path, "s", [1, 2])
    bad = fill(tmp_path, "s", [3, 4])
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))

    report = cache.verify(tmp_path)
    assert report.checked == 2 and not report.ok
    assert str(bad) in report.corrupt[0] and bad.exists()

    runner = CliRunner()
    result = runner.invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 1
    result = runner.invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path), "--repair"])
    assert result.exit_code == 0, result.output
    assert good.exists() and not bad.exists()
    assert cache.verify(tmp_path).ok

    # the repaired cache serves what it still has and misses the rest
    fresh = FeatureCache(tmp_path, "s")
    fresh.refresh()
    assert sha(1) in fresh and sha(3) not in fresh


def test_a_truncated_shard_is_quarantined_by_readers_and_rewritten_by_writers(tmp_path):
    bad = fill(tmp_path, "s", [1])
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[:50])
    reader = FeatureCache(tmp_path, "s")
    reader.refresh()
    assert len(reader) == 0
    assert not bad.exists() and len(list((tmp_path / "s" / cache.QUARANTINE).iterdir())) == 1
    assert cache.verify(tmp_path).ok  # quarantined files are out of the way
    # the same features land under the same name again: a real file this time
    assert fill(tmp_path, "s", [1]).read_bytes() == good_bytes


@pytest.mark.parametrize("damage", ["zeroed-features", "truncated-after-indexing", "bit-flip"])
def test_a_shard_damaged_under_its_name_is_never_served(tmp_path, damage):
    shard = fill(tmp_path, "s", [1, 2])
    reader = FeatureCache(tmp_path, "s")
    reader.refresh()  # indexed while intact
    if damage == "zeroed-features":  # a valid npz, same ids, all-zero rows
        buf = io.BytesIO()
        np.savez(buf, sha256=np.array([sha(1), sha(2)]), features=np.zeros((2, 8), np.float32))
        shard.write_bytes(buf.getvalue())
    elif damage == "truncated-after-indexing":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        data = bytearray(shard.read_bytes())
        data[-40] ^= 0x01
        shard.write_bytes(bytes(data))
    with pytest.raises(cache.EntriesLost) as info:
        reader.get([sha(1), sha(2)])
    assert info.value.shards == [shard]
    assert sha(1) not in reader and not shard.exists()
    assert len(list((tmp_path / "s" / cache.QUARANTINE).iterdir())) == 1
    # re-put and served again, the real features
    reader.put([sha(1), sha(2)], feats_for([1, 2]))
    assert np.array_equal(reader.get([sha(2), sha(1)]), feats_for([2, 1]))


def test_a_writer_rewrites_a_same_named_shard_with_other_bytes(tmp_path):
    shard = fill(tmp_path, "s", [5])
    good = shard.read_bytes()
    shard.write_bytes(b"\0" * len(good))  # same size, zeros
    assert fill(tmp_path, "s", [5]) == shard and shard.read_bytes() == good


def test_gc_keeps_referenced_entries_in_every_space_and_drops_the_rest(tmp_path):
    fill(tmp_path, "a", [1, 2, 3])  # partly referenced: rewritten with 1 and 2
    fill(tmp_path, "a", [7, 8])  # unreferenced: removed
    fill(tmp_path, "b", [2, 9])
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,sha256\n" + "".join(f"x{i},c,{sha(i)}\n" for i in (1, 2, 5)))

    result = CliRunner().invoke(
        app, ["cache", "gc", "--cache-dir", str(tmp_path), "--manifest", str(manifest)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["entries_dropped"] == 4 and report["entries_kept"] == 3
    assert report["bytes_after"] < report["bytes_before"]
    a = FeatureCache(tmp_path, "a")
    a.refresh()
    assert {sha(1), sha(2)} == set(a._index)
    np.testing.assert_array_equal(a.get([sha(2), sha(1)]), feats_for([2, 1]))
    assert cache.verify(tmp_path).ok


def test_gc_refuses_without_any_manifest(tmp_path, monkeypatch):
    fill(tmp_path, "a", [1])
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["cache", "gc", "--cache-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert len(cache.shards(tmp_path / "a")) == 1


def test_info_counts_entries_per_space_and_reports_the_last_hit_rate(tmp_path):
    fill(tmp_path, "a", [1, 2])
    fill(tmp_path, "a", [2, 3])
    fill(tmp_path, "b", [4])
    cache.record_run(tmp_path, {"images": 4, "hits": 3, "misses": 1, "hit_rate": 0.75})
    result = CliRunner().invoke(app, ["cache", "info", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    assert got["spaces"]["a"]["entries"] == 3 and got["spaces"]["a"]["shards"] == 2
    assert got["spaces"]["b"]["entries"] == 1
    assert got["shards"] == 3 and got["bytes"] > 0
    assert got["last_run"]["features"]["hit_rate"] == 0.75


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from tests.unit.test_cache import feats_for, sha
    from transferlab.cache import FeatureCache

    root, start, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    c = FeatureCache(root, "space")
    for r in range(rounds):
        c.refresh()
        ids = [i for i in range(start + 5 * r, start + 5 * r + 40) if sha(i) not in c]
        if ids:
            c.put([sha(i) for i in ids], feats_for(ids, dim=256))
        print("round", r, flush=True)
    """
)


def test_two_processes_filling_one_cache_end_consistent(tmp_path):
    # overlapping id ranges, so both often write the same images at the same time
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), str(start), "30"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for start in (0, 20)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert cache.verify(tmp_path).ok
    assert not list(tmp_path.rglob("*.tmp"))
    c = FeatureCache(tmp_path, "space")
    c.refresh()
    ids = list(range(0, 20 + 5 * 29 + 40))
    assert set(c._index) == {sha(i) for i in ids}
    # whichever shard serves an image, it serves that image's features
    np.testing.assert_array_equal(c.get([sha(i) for i in ids]), feats_for(ids, dim=256))


KILLED_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np
    from transferlab.cache import FeatureCache

    c = FeatureCache(Path(sys.argv[1]), "space")
    for r in range(1000):
        # ~32 MB per shard, so a kill lands inside a write most of the time
        feats = np.full((4000, 2000), r, dtype=np.float32)
        print("writing", r, flush=True)
        c.put([f"{r}-{i}" for i in range(4000)], feats)
    """
)


def test_sigkill_mid_write_leaves_no_corrupt_shard(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)], cwd=REPO, stdout=subprocess.DEVNULL
    )
    # the temp file exists only while a shard is being written: kill the writer the moment
    # one shows up after a few complete shards, so the kill lands inside a write
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(cache.shards(tmp_path / "space")) >= 2 and list(tmp_path.rglob(".shard-*.tmp")):
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert list(tmp_path.rglob(".shard-*.tmp")), "the kill did not land inside a write"
    report = cache.verify(tmp_path)
    assert report.checked >= 2 and report.ok, report.corrupt
    reader = FeatureCache(tmp_path, "space")
    reader.refresh()  # the leftover temp file is invisible to readers
    for shard in cache.shards(tmp_path / "space"):
        with np.load(shard) as z:
            r = int(z["sha256"][0].split("-")[0])
            assert (z["features"] == r).all()
    assert len(reader) == 4000 * len(cache.shards(tmp_path / "space"))


@pytest.mark.parametrize("value", ["auto", 8])
def test_batch_size_accepts_auto_or_int(value):
    from transferlab.config import FeaturesParams

    assert FeaturesParams(batch_size=value).batch_size == value


def test_an_unchanged_shard_is_hashed_once_and_a_rewritten_one_again(tmp_path, monkeypatch):
    import os

    shard = fill(tmp_path, "s", [1, 2])
    hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(shard, ns=(hour_ago, hour_ago))  # not "racily" fresh: its stat can be trusted
    FeatureCache(tmp_path, "s").refresh()
    first = FeatureCache(tmp_path, "s")
    first.refresh()
    first.get([sha(1)])  # hashed, then recorded by size, mtime and inode
    assert shard.name in json.loads((tmp_path / "s" / cache.VERIFIED).read_text())

    def no_hash(path):
        raise AssertionError(f"{path} hashed again although unchanged")

    monkeypatch.setattr(cache, "file_sha256", no_hash)
    again = FeatureCache(tmp_path, "s")
    again.refresh()
    assert np.array_equal(again.get([sha(2)]), feats_for([2]))
    monkeypatch.undo()

    buf = io.BytesIO()  # rewritten in place with zeros: a new mtime, so hashed and refused
    np.savez(buf, sha256=np.array([sha(1), sha(2)]), features=np.zeros((2, 8), np.float32))
    shard.write_bytes(buf.getvalue())
    third = FeatureCache(tmp_path, "s")
    third.refresh()
    with pytest.raises(cache.EntriesLost):
        third.get([sha(1)])
