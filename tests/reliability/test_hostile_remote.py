"""Hostile remote sources, one row per class, two or more probes each: S3 keys that would name a
path outside the download folder, and an HTTP source moved to a URL that does not serve the
archive whose sha256 is already cached (issue 18, data side)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_workspace
from tests.integration.helpers import ArchiveServer, png_bytes, tar_gz
from tests.integration.moto import MotoServer, isolate_aws_env
from tests.reliability.cases import Case
from tests.reliability.test_hostile_input import CANARIES, _snapshot
from transferlab.config import load_params
from transferlab.data import DataSourceError, read_manifest
from transferlab.stages import STAGES

pytestmark = pytest.mark.integration


def _pull(ws: Path, source: dict) -> dict:
    (ws / "params.yaml").write_text(yaml.safe_dump({"data": {"source": source, "min_size": 16}}))
    return STAGES["pull"].run(load_params(ws / "params.yaml"), ws)


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


EVIL_KEYS = {
    "shapes//abs/path/evil.png": "absolute path",
    "shapes/circles/../../../../tmp/evil.png": "'..'",
    "shapes/circles/./x.png": "'.'",
    "shapes/circles/evil\x01.png": "control character",
}


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "s3-unsafe-keys",
            "S3 keys 'prefix//abs/path/evil.png', 'prefix/c/../../../../tmp/evil.png', "
            "'prefix/c/./x.png' and one with a control character",
            "exit 0: those keys are not downloaded and are listed in rejected.json with the "
            "reason; the good objects are pulled",
            "nothing written outside the download folder and the workspace",
        ).param()
    ],
)
def test_s3_keys_cannot_leave_the_download_folder(case, moto, tmp_path, monkeypatch):
    isolate_aws_env(monkeypatch, tmp_path)
    s3 = moto.client()
    s3.create_bucket(Bucket="hostile")
    for k, label in enumerate(("circles", "squares")):
        for i in range(4):
            s3.put_object(
                Bucket="hostile", Key=f"shapes/{label}/{i}.png", Body=png_bytes(k * 9 + i)
            )
    for key in EVIL_KEYS:
        s3.put_object(Bucket="hostile", Key=key, Body=png_bytes(seed=666))
    ws = write_workspace(tmp_path / "ws", {})
    outside = _snapshot(tmp_path, skip=tmp_path / "ws")
    source = {
        "kind": "s3",
        "url": "s3://hostile/shapes",
        "endpoint_url": moto.url,
        "path": str(ws / "downloads"),
    }
    summary = _pull(ws, source)
    assert summary["kept"] == {"circles": 4, "squares": 4}
    rejected = json.loads((ws / "data/rejected.json").read_text())
    reasons = {r["source"]: r["reason"] for r in rejected}
    for key, why in EVIL_KEYS.items():
        assert why in reasons[f"s3://hostile/{key}"], reasons
    assert _snapshot(tmp_path, skip=tmp_path / "ws") == outside
    for canary in CANARIES:
        assert not canary.exists()
    assert not [p for p in ws.rglob("evil*")]


MEMBERS = {
    f"shapes-1.0/{label}/{i:02d}.png": png_bytes(seed=100 * k + i, size=48)
    for k, label in enumerate(("circles", "squares"))
    for i in range(4)
}
ARCHIVE = tar_gz(MEMBERS)
SHA = hashlib.sha256(ARCHIVE).hexdigest()


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "http-moved-url-with-cached-sha",
            "after a good HTTP pull, the source URL changed to one answering 404, and to one "
            "serving a corrupt copy, same sha256",
            "exit 1 naming the new URL (HTTP 404 / checksum mismatch): the URL is contacted",
            "data/ and its manifest (source column) from the good pull; the cached archive",
        ).param()
    ],
)
def test_a_moved_http_source_is_contacted(case, tmp_path):
    server = ArchiveServer()
    try:
        server.files = {"/good.tar.gz": ARCHIVE, "/bad.tar.gz": ARCHIVE[:-64] + bytes(64)}
        server.status["/gone.tar.gz"] = 404
        ws = write_workspace(tmp_path / "ws", {})
        source = {"kind": "http", "sha256": SHA, "path": str(tmp_path / "dl"), "retries": 1}
        _pull(ws, {**source, "url": server.url + "/good.tar.gz"})
        manifest = (ws / "data/manifest.csv").read_bytes()
        for path, match in (("/gone.tar.gz", "HTTP 404"), ("/bad.tar.gz", "checksum mismatch")):
            with pytest.raises(DataSourceError, match=match) as info:
                _pull(ws, {**source, "url": server.url + path})
            assert server.url + path in str(info.value)
            assert (ws / "data/manifest.csv").read_bytes() == manifest
        rows = read_manifest(ws / "data/manifest.csv")
        assert {r["source"].split("#")[0] for r in rows} == {server.url + "/good.tar.gz"}
        assert (tmp_path / "dl" / f"{SHA}.tar.gz").is_file()
    finally:
        server.close()
