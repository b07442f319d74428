"""Every params value is checked before any work: one line naming file, key and what is allowed,
within bounded time and memory for hostile YAML, and never echoing a credential."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from transferlab.config import MAX_PARAMS_BYTES, ParamsError, load_params

SHA = "a" * 64


def _laughs(levels: int = 9) -> str:
    text = "a: &a ['lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol']\n"
    prev = "a"
    for name in "bcdefghijklm"[: levels - 1]:
        text += f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]\n"
        prev = name
    return text + f"split: {{seed: *{prev}}}\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("split: {val: 0.6, test: 0.6}\n", ["split", "leaves nothing to train on", "below 1"]),
        ("split: {val: 0.5, test: 0.5}\n", ["split", "leaves nothing to train on"]),
        ("split: {seed: -1}\n", ["split.seed", "greater than or equal to 0"]),
        ("top: {seed: 99999999999}\n", ["top.seed"]),
        ("attack: {seed: -5}\n", ["attack.seed"]),
        ("learning_curve: {seeds: [0, -1]}\n", ["learning_curve.seeds"]),
        ("svm: {C: [.inf]}\n", ["svm.C.0", "finite"]),
        ("top: {lr: .nan}\n", ["top.lr", "finite"]),
        ("data: {max_pixels: .inf}\n", ["data.max_pixels"]),
        ("full: {epochs: 10000000000000}\n", ["full.epochs", "out of range"]),
        ("data: {source: {kind: tuxpaint_photos, classes: {}}}\n", ["data.source.classes"]),
        (
            "data: {source: {kind: tuxpaint_photos, classes: {a: [], b: [x]}}}\n",
            ["class 'a' lists no folder"],
        ),
        ("data: {source: {kind: idx, path: x, classes: ['..', b]}}\n", ["'..'"]),
        ("data: {source: {kind: idx, path: x, splits: []}}\n", ["data.source.splits"]),
        ("learning_curve: {n_per_class: []}\n", ["learning_curve.n_per_class"]),
        (
            f"data: {{source: {{kind: http, url: 'http://h/a.tgz', sha256: {SHA}, root: ..}}}}\n",
            ["root"],
        ),
    ],
)
def test_bad_values_fail_at_load_with_one_line(tmp_path, text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (
            "data: {source: {kind: s3, url: 's3://b/p', endpoint_url: 'http://user:pass@h/'}}\n",
            "user:pass",
        ),
        (
            f"data: {{source: {{kind: http, url: 'https://u:s3cret@h/a.tgz', sha256: {SHA}}}}}\n",
            "s3cret",
        ),
        (
            f"data: {{source: {{kind: http, url: 'https://h/a?token=t0k3n', sha256: {SHA}}}}}\n",
            "t0k3n",
        ),
        ("tracking: {tracking_uri: 'postgresql://me:hunter2@db/mlflow'}\n", "hunter2"),
        ("runner: {kind: dask, address: 'tcp://u:pw@host:8786'}\n", "u:pw"),
    ],
)
def test_credentials_in_urls_are_refused_without_echoing_them(tmp_path, text, secret):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert secret not in message
    assert "environment" in message and "AWS_" in message


def test_non_utf8_params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"split: {seed: 1}\n# caf\xe9\n")
    with pytest.raises(ParamsError, match=r"not UTF-8 text \(byte 0xe9 at offset 22\)"):
        load_params(path)


def test_billion_laughs_fails_fast_in_small_memory(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(_laughs())
    assert path.stat().st_size < 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ParamsError, match="expands to more than") as info:
        load_params(path)
    assert len(str(info.value)) < 400
    # ru_maxrss is in KiB; the unbounded version grew by gigabytes
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024


def test_self_referencing_yaml_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("a: &a [*a]\nsplit: {seed: 0}\n")
    with pytest.raises(ParamsError, match="self-reference"):
        load_params(path)


def test_huge_params_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "params.yaml"
    with open(path, "wb") as f:
        f.truncate(MAX_PARAMS_BYTES + 1)
    with pytest.raises(ParamsError, match="too large for a params file"):
        load_params(path)


def test_error_lines_quote_values_briefly(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("features: {backbone: " + "x" * 5000 + "}\n")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert len(str(info.value)) < 1000


def test_defaults_and_the_repo_params_still_load():
    load_params(Path(__file__).resolve().parents[2] / "params.yaml")
