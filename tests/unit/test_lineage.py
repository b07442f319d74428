"""Lineage tags: DVC's own data hash, the dvc.lock hash, and model specs for the registry."""

from __future__ import annotations

import hashlib
import subprocess

import pytest
import yaml

from transferlab.data.version import dvc_dir_hash
from transferlab.lineage import dvc_state
from transferlab.tracking import parse_model_spec


def _images(root):
    (root / "data/images/a").mkdir(parents=True)
    (root / "data/images/b").mkdir(parents=True)
    (root / "data/images/a/1.png").write_bytes(b"one")
    (root / "data/images/b/2.png").write_bytes(b"two")


def test_data_hash_is_the_one_dvc_records(tmp_path):
    _images(tmp_path)
    env_args = {"cwd": tmp_path, "check": True, "capture_output": True}
    subprocess.run(["git", "init", "-q"], **env_args)
    subprocess.run(["dvc", "init", "-q"], **env_args)
    subprocess.run(["dvc", "config", "core.analytics", "false"], **env_args)
    subprocess.run(
        ["dvc", "config", "core.site_cache_dir", str(tmp_path / ".dvc/site")], **env_args
    )
    subprocess.run(["dvc", "add", "-q", "data/images"], **env_args)
    recorded = yaml.safe_load((tmp_path / "data/images.dvc").read_text())["outs"][0]["md5"]
    assert dvc_dir_hash(tmp_path / "data/images") == recorded
    assert recorded.endswith(".dir")


def test_dvc_state_outside_and_inside_dvc(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert dvc_state(tmp_path) == {}
    _images(tmp_path)
    assert dvc_state(tmp_path) == {}  # outside DVC and without a dvc.lock: nothing to say
    # what `dvc repro` gives a stage command: DVC_ROOT, DVC_STAGE and a dvc.lock
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_STAGE", "report")
    inside = dvc_state(tmp_path)
    assert inside["dvc.stage"] == "report"
    assert inside["dvc.lock_hash"] == hashlib.sha256(b"schema: '2.0'\nstages: {}\n").hexdigest()


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("tiny-svm@champion", ("tiny-svm", "champion", None)),
        ("tiny-svm/3", ("tiny-svm", None, "3")),
        ("tiny-svm", ("tiny-svm", None, None)),
        ("team/model@candidate", ("team/model", "candidate", None)),
    ],
)
def test_model_specs(spec, parsed):
    assert parse_model_spec(spec) == parsed
