"""Torch files are read with the restricted unpickler only, and write errors name the file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from transferlab import tensor_files


class _Payload:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant_pickle(path: Path, marker: Path, *, wrap: bool = True) -> Path:
    """A torch file whose unpickling would create ``marker``: a planted payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"weight": torch.zeros(2), "x": _Payload(marker)} if wrap else _Payload(marker), path
    )
    return path


@pytest.mark.parametrize("wrap", [True, False], ids=["inside-a-state-dict", "bare-object"])
def test_a_planted_pickle_is_refused_and_never_runs(tmp_path, wrap):
    marker = tmp_path / "pwned"
    evil = plant_pickle(tmp_path / "head.pt", marker, wrap=wrap)
    with pytest.raises(tensor_files.UnsafeFileError, match="refusing to load") as info:
        tensor_files.load(evil)
    assert str(evil) in str(info.value) and "nothing was executed" in str(info.value)
    assert not marker.exists()


def test_truncated_file_is_corrupt_and_named(tmp_path):
    path = tmp_path / "w.pt"
    tensor_files.save({"w": torch.arange(1000.0)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(tensor_files.CorruptFileError, match="cannot read") as info:
        tensor_files.load(path)
    assert str(path) in str(info.value)


def test_round_trip_keeps_tensors_and_plain_data(tmp_path):
    state = {"w": torch.randn(3, 4), "history": [{"epoch": 0, "acc": 0.5, "val": None}]}
    tensor_files.save(state, tmp_path / "s.pt")
    back = tensor_files.load(tmp_path / "s.pt")
    assert torch.equal(back["w"], state["w"]) and back["history"] == state["history"]


def test_nothing_else_calls_torch_load():
    """The one reader is tensor_files.load: any other torch.load could unpickle code."""
    package = Path(__file__).resolve().parents[2] / "transferlab"
    offenders = []
    for py in package.rglob("*.py"):
        if py.name == "tensor_files.py":
            continue
        for node in ast.walk(ast.parse(py.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("load", "jit_load")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ) or (
                isinstance(node, ast.Attribute)
                and node.attr == "load_model"
                and isinstance(node.value, ast.Attribute)
                and node.value.attr in ("pytorch", "pyfunc")
            ):
                offenders.append(f"{py.relative_to(package.parent)}:{node.lineno}")
    assert offenders == []


def test_full_disk_names_the_file(tmp_path):
    import subprocess

    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)]).returncode:
        pytest.fail("could not mount a small tmpfs (the suite runs as root in CI)")
    try:
        dest = mount / "models" / "full" / "backbone.pt"
        tensor_files.save({"w": torch.zeros(4)}, dest)
        before = dest.read_bytes()
        with pytest.raises(OSError, match="No space left on device while writing") as info:
            tensor_files.save({"w": torch.zeros(100_000)}, dest)  # 400 KB into 64 KB
        assert str(dest) in str(info.value)
        assert dest.read_bytes() == before  # the old file is untouched
        assert sorted(p.name for p in dest.parent.iterdir()) == ["backbone.pt"]  # no temp file
    finally:
        subprocess.run(["umount", str(mount)], check=False)
