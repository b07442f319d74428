from __future__ import annotations

from pathlib import Path

import pytest

from transferlab.config import SplitParams
from transferlab.data import DataSourceError, read_manifest, split_manifest
from transferlab.data.split import min_class_size, split_sizes


def _assignment(path: Path) -> dict[str, str]:
    return {r["path"]: r["split"] for r in read_manifest(path)}


def test_stratified_and_complete(write_manifest, tmp_path: Path) -> None:
    manifest = write_manifest({"a": 40, "b": 12, "c": 5})
    out = tmp_path / "split.csv"
    counts = split_manifest(manifest, SplitParams(seed=0, val=0.2, test=0.25), out)

    assert counts == {
        "train": {"a": 22, "b": 7, "c": 3},
        "val": {"a": 8, "b": 2, "c": 1},
        "test": {"a": 10, "b": 3, "c": 1},
    }
    rows = read_manifest(out)
    src = read_manifest(manifest)
    assert [r["path"] for r in rows] == [r["path"] for r in src]  # manifest order
    assert list(rows[0]) == ["path", "label", "sha256", "split"]
    for split, per_label in counts.items():
        for label, n in per_label.items():
            assert sum(r["split"] == split and r["label"] == label for r in rows) == n
    assert out.read_bytes().endswith(b"\n") and b"\r" not in out.read_bytes()


def test_deterministic_and_seed_dependent(write_manifest, tmp_path: Path) -> None:
    manifest = write_manifest({"a": 30, "b": 30})
    one, two, other = tmp_path / "1.csv", tmp_path / "2.csv", tmp_path / "3.csv"
    split_manifest(manifest, SplitParams(seed=7), one)
    split_manifest(manifest, SplitParams(seed=7), two)
    split_manifest(manifest, SplitParams(seed=8), other)
    assert one.read_bytes() == two.read_bytes()
    assert _assignment(one) != _assignment(other)


def test_order_comes_from_content_not_file_names(write_manifest, tmp_path: Path) -> None:
    manifest = write_manifest({"a": 20, "b": 20})
    split_manifest(manifest, SplitParams(seed=1), tmp_path / "x.csv")
    by_sha = {r["sha256"]: r["split"] for r in read_manifest(tmp_path / "x.csv")}
    # same images (same sha256), listed in reverse: same assignment
    rows = read_manifest(manifest)
    lines = manifest.read_text("utf-8").splitlines()
    manifest.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n", encoding="utf-8")
    split_manifest(manifest, SplitParams(seed=1), tmp_path / "y.csv")
    assert {r["sha256"]: r["split"] for r in read_manifest(tmp_path / "y.csv")} == by_sha
    assert len(by_sha) == len(rows)


def test_per_class_caps_before_splitting(write_manifest, tmp_path: Path) -> None:
    manifest = write_manifest({"a": 40, "b": 6})
    out = tmp_path / "split.csv"
    counts = split_manifest(manifest, SplitParams(per_class=10, val=0.2, test=0.3), out)
    assert {label: sum(counts[s][label] for s in counts) for label in ("a", "b")} == {
        "a": 10,
        "b": 6,
    }
    assert counts["test"]["a"] == 3 and counts["val"]["a"] == 2
    assert len(read_manifest(out)) == 16


def test_growing_one_class_leaves_others_alone(write_manifest, tmp_path: Path) -> None:
    before = write_manifest({"a": 20, "b": 15, "c": 9}, name="before.csv")
    after = write_manifest({"a": 20, "b": 31, "c": 9}, name="after.csv")
    split_manifest(before, SplitParams(seed=3), tmp_path / "1.csv")
    split_manifest(after, SplitParams(seed=3), tmp_path / "2.csv")
    one, two = _assignment(tmp_path / "1.csv"), _assignment(tmp_path / "2.csv")
    for path, split in one.items():
        if not path.startswith("images/b/"):
            assert two[path] == split, path


def test_val_zero_gives_no_validation_images(write_manifest, tmp_path: Path) -> None:
    counts = split_manifest(
        write_manifest({"a": 10, "b": 10}), SplitParams(val=0.0, test=0.3), tmp_path / "s.csv"
    )
    assert counts["val"] == {"a": 0, "b": 0}
    assert counts["test"] == {"a": 3, "b": 3}


def test_too_few_images_names_the_class(write_manifest, tmp_path: Path) -> None:
    manifest = write_manifest({"plenty": 20, "lonely": 1})
    with pytest.raises(DataSourceError) as info:
        split_manifest(manifest, SplitParams(val=0.2, test=0.25), tmp_path / "s.csv")
    msg = str(info.value)
    assert "'lonely' has 1" in msg and "plenty" not in msg
    assert "at least 2" in msg
    assert "add images" in msg and "split.val" in msg and "split.test" in msg
    assert not (tmp_path / "s.csv").exists()


def test_per_class_can_make_a_class_too_small(write_manifest, tmp_path: Path) -> None:
    manifest = write_manifest({"a": 20, "b": 20})
    with pytest.raises(DataSourceError, match="per_class=1"):
        split_manifest(manifest, SplitParams(per_class=1), tmp_path / "s.csv")


def test_failed_split_keeps_previous_output(write_manifest, tmp_path: Path) -> None:
    out = tmp_path / "s.csv"
    split_manifest(write_manifest({"a": 5, "b": 5}), SplitParams(), out)
    before = out.read_bytes()
    with pytest.raises(DataSourceError):
        split_manifest(write_manifest({"a": 5, "b": 1}), SplitParams(), out)
    assert out.read_bytes() == before


@pytest.mark.parametrize(
    ("n", "val", "test", "expected"),
    [
        (1, 0.2, 0.25, (0, 0, 1)),
        (2, 0.2, 0.25, (1, 0, 1)),
        (3, 0.2, 0.25, (1, 1, 1)),
        (10, 0.2, 0.25, (6, 2, 2)),
        (10, 0.0, 0.5, (5, 0, 5)),
        (100, 0.1, 0.2, (70, 10, 20)),
    ],
)
def test_split_sizes(n: int, val: float, test: float, expected: tuple[int, int, int]) -> None:
    assert split_sizes(n, val=val, test=test) == expected


def test_min_class_size() -> None:
    assert min_class_size(val=0.2, test=0.25) == 2
    assert min_class_size(val=0.0, test=0.25) == 2
    assert min_class_size(val=0.4, test=0.5) == 5  # 4 would give 2 test + 2 val


def test_shots_draw_nested_training_sets_and_keep_val_test(write_manifest, tmp_path: Path) -> None:
    manifest = write_manifest({"a": 30, "b": 12})

    def assignment(**kw) -> dict[str, str]:
        out = tmp_path / f"split-{kw}.csv"
        split_manifest(manifest, SplitParams(seed=3, **kw), out)
        return {r["path"]: r["split"] for r in read_manifest(out)}

    full, two, five = assignment(), assignment(shots=2), assignment(shots=5)
    for shots, got in ((2, two), (5, five)):
        train = [p for p, s in got.items() if s == "train"]
        assert sorted(p.split("/")[1] for p in train) == ["a"] * shots + ["b"] * shots
        # val and test are exactly the unrestricted split's
        assert {p: s for p, s in got.items() if s != "train"} == {
            p: s for p, s in full.items() if s != "train"
        }
    assert {p for p, s in two.items() if s == "train"} < {
        p for p, s in five.items() if s == "train"
    }
