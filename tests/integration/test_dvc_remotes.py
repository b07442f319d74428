"""DVC remotes: the default local-directory remote, and an S3 remote (dvc-s3) on moto_server."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.integration.helpers import png_bytes
from tests.integration.moto import CREDENTIALS, MotoServer
from transferlab.data.version import dvc_dir_hash

pytestmark = pytest.mark.integration


def sh(*args: str, cwd: Path, env: dict | None = None) -> str:
    out = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    assert out.returncode == 0, f"{args}: {out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git + DVC repo with the project's .dvc/config and a tracked data/images folder."""
    ws = tmp_path / "ws"
    images = ws / "data" / "images"
    for k, label in enumerate(["cats", "dogs é"]):
        (images / label).mkdir(parents=True)
        for i in range(5):
            (images / label / f"{i}.png").write_bytes(png_bytes(100 * k + i))
    sh("git", "init", "-q", cwd=ws)
    sh("dvc", "init", "-q", cwd=ws)
    shutil.copy(REPO / ".dvc" / "config", ws / ".dvc" / "config")
    sh("dvc", "config", "--local", "core.site_cache_dir", str(tmp_path / "site_cache"), cwd=ws)
    sh("dvc", "add", "data/images", cwd=ws)
    return ws


def _round_trip(ws: Path, env: dict | None = None, remote: list[str] | None = None) -> None:
    before = _snapshot(ws / "data" / "images")
    sh("dvc", "push", *(remote or []), cwd=ws, env=env)
    shutil.rmtree(ws / ".dvc" / "cache")
    shutil.rmtree(ws / "data" / "images")
    sh("dvc", "pull", *(remote or []), cwd=ws, env=env)
    assert _snapshot(ws / "data" / "images") == before


def test_our_dir_hash_is_dvcs(repo: Path) -> None:
    recorded = yaml.safe_load((repo / "data" / "images.dvc").read_text())["outs"][0]["md5"]
    assert dvc_dir_hash(repo / "data" / "images") == recorded


def test_default_local_remote_round_trip(repo: Path) -> None:
    # .dvc/config's default remote is ../transferlab-dvc-remote, beside the checkout.
    store = repo.parent / "transferlab-dvc-remote"
    assert "local" in sh("dvc", "remote", "default", cwd=repo)
    _round_trip(repo)
    assert store.is_dir() and any(store.rglob("*"))


@pytest.mark.slow
def test_s3_remote_round_trip_on_moto(repo: Path, tmp_path: Path) -> None:
    server = MotoServer(tmp_path)
    try:
        server.client().create_bucket(Bucket="dvc-store")
        sh("dvc", "remote", "add", "s3store", "s3://dvc-store/transferlab", cwd=repo)
        sh("dvc", "remote", "modify", "s3store", "endpointurl", server.url, cwd=repo)
        sh("dvc", "remote", "modify", "s3store", "region", "us-east-1", cwd=repo)
        # Keys only in the git-ignored config.local (or the environment), never committed.
        for key, var in (
            ("access_key_id", "AWS_ACCESS_KEY_ID"),
            ("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
        ):
            sh("dvc", "remote", "modify", "--local", "s3store", key, CREDENTIALS[var], cwd=repo)
        assert "testing" not in (repo / ".dvc" / "config").read_text()
        _round_trip(repo, remote=["-r", "s3store"])
        keys = [o["Key"] for o in server.client().list_objects_v2(Bucket="dvc-store")["Contents"]]
        assert any(k.endswith(".dir") for k in keys) and len(keys) >= 11
    finally:
        server.stop()
