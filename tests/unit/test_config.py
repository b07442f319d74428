import subprocess
import sys
from pathlib import Path

import pytest

from transferlab.config import ParamsError, load_params, parse_eps

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_repo_params_file_is_valid():
    params = load_params(REPO / "params.yaml")
    assert params.features.backbone == "efficientnet_lite0"
    assert params.attack.eps[3] == pytest.approx(4 / 255)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("svm:\n  Cc: [1]\n", ["unknown key 'svm.Cc'", "allowed keys here: C, cv"]),
        ("bogus: 1\n", ["unknown key 'bogus'", "data, split, features"]),
        ("data:\n  source:\n    kind: folder\n    path: x\n    extra: 1\n", ["data.source.extra"]),
        ("attack:\n  eps: [0, 4/0x]\n", ["attack.eps", "does not parse"]),
        ("attack:\n  eps: [-0.1]\n", ["attack.eps", "outside [0, 1]"]),
        ("attack:\n  eps: [2]\n", ["outside [0, 1]"]),
        ("attack:\n  attacks: [nope]\n", ["attack.attacks.0", "allowed values are 'fgsm'"]),
        ("features:\n  backbone: alexnet9\n", ["features.backbone", "unknown backbone"]),
        ("features:\n  batch_size: many\n", ["features.batch_size", "integer"]),
        ("data:\n  source:\n    kind: ftp\n", ["data.source", "allowed values are 'folder'"]),
        ("svm: [1, 2\n", ["invalid YAML", "line"]),
        ("", ["the file is empty"]),
        ("- a\n- b\n", ["expected a mapping"]),
    ],
)
def test_bad_params_give_one_line_naming_key_file_and_fix(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for part in expected:
        assert part in message


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize(("raw", "value"), [("4/255", 4 / 255), ("0.5", 0.5), (0, 0.0), (1, 1.0)])
def test_parse_eps(raw, value):
    assert parse_eps(raw) == pytest.approx(value)


def test_params_are_frozen_and_hash_by_section():
    p = load_params(REPO / "params.yaml")
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises its own frozen error
        p.svm.cv = 5  # type: ignore[misc]
    assert p.section_hash("svm") != p.section_hash("attack")
    assert p.section_hash("svm") == load_params(REPO / "params.yaml").section_hash("svm")
    flat = p.flat()
    assert flat["features.backbone"] == "efficientnet_lite0"


def test_cli_bad_key_exits_2_and_writes_nothing(tmp_path):
    write(tmp_path, "svm:\n  Cc: [1]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "transferlab.cli", "pull"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "svm.Cc" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
