"""A flaky network under the pull stage: an HTTP archive server and an S3 endpoint on 127.0.0.1
that fail in the ways real ones do. Each fault ends in a resumed download or in one clear error
after the retries, with nothing half-written left behind and the previous dataset whole."""

from __future__ import annotations

import hashlib
import logging
import re
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_workspace
from tests.integration.helpers import ArchiveServer, free_port, png_bytes, tar_gz
from tests.integration.moto import MotoServer, isolate_aws_env
from tests.reliability.cases import Case
from tests.reliability.conftest import tree_digest
from transferlab.data import DataSourceError

pytestmark = pytest.mark.integration

# 2 classes x 16 random 64 px PNGs: about 400 kB that gzip cannot shrink, so a cut mid-body
# leaves several 64 kB chunks on disk for the resume
MEMBERS = {
    f"shapes-1.0/{label}/{i:02d}.png": png_bytes(seed=100 * k + i, size=64)
    for k, label in enumerate(("circles", "squares"))
    for i in range(16)
}
ARCHIVE = tar_gz(MEMBERS)
SHA = hashlib.sha256(ARCHIVE).hexdigest()


def _pull(ws: Path, source: dict) -> dict:
    """The pull stage, in process, with ``source`` as data.source (min_size fits the PNGs)."""
    from transferlab.config import load_params
    from transferlab.stages import STAGES

    params = {"data": {"source": source, "min_size": 16}}
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    return STAGES["pull"].run(load_params(ws / "params.yaml"), ws)


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` (hidden ones too), relative."""
    if not folder.exists():
        return []
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------ HTTP


@pytest.fixture(scope="module")
def http_server():
    server = ArchiveServer()
    yield server
    server.close()


@pytest.fixture
def http(http_server):
    http_server.clear()
    http_server.files = {"/shapes.tar.gz": ARCHIVE}
    return http_server


def _http_source(server: ArchiveServer, cache: Path, *, path="/shapes.tar.gz", sha=SHA) -> dict:
    return {
        "kind": "http",
        "url": server.url + path,
        "sha256": sha,
        "path": str(cache),
        "retries": 2,
        "timeout": 5,
    }


@pytest.mark.parametrize(
    ("case", "status", "attempts", "message"),
    [
        Case(
            "http-404",
            "the archive URL answers 404",
            "exit 1 at once (no retry), names the URL and data.source.url",
            "no data/, no partial download",
        ).param(404, 1, r"cannot download \S+/gone\.tar\.gz: HTTP 404 .*check data\.source\.url"),
        Case(
            "http-500",
            "the archive server answers 500",
            "exit 1 after the 2 retries, names the URL and the status",
            "no data/, no partial download",
        ).param(500, 3, r"cannot download \S+/gone\.tar\.gz after 3 attempts: HTTP 500"),
    ],
)
def test_http_error_is_clear_after_the_retries(case, status, attempts, message, http, tmp_path):
    http.status["/gone.tar.gz"] = status
    ws = write_workspace(tmp_path / "ws", {})
    with pytest.raises(DataSourceError, match=message):
        _pull(ws, _http_source(http, tmp_path / "dl", path="/gone.tar.gz"))
    assert len(http.requests) == attempts
    assert _files(tmp_path / "dl") == []
    assert not (ws / "data").exists()


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "http-connection-reset",
            "the connection is reset (RST) mid-download",
            "resumed with a Range request to a correct archive; the pull completes",
            "the bytes already received (not fetched twice)",
        ).param()
    ],
)
def test_http_reset_is_resumed(case, http, tmp_path):
    cut = len(ARCHIVE) // 2
    http.reset_after = cut
    ws = write_workspace(tmp_path / "ws", {})
    result = _pull(ws, _http_source(http, tmp_path / "dl"))
    assert result["kept"] == {"circles": 16, "squares": 16}
    (first, _), (second, rng) = http.requests
    assert first == second == "/shapes.tar.gz"
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
    # whole 64 kB chunks written before the reset are kept; only the rest is fetched again
    assert 1 << 16 <= resumed_at <= cut
    assert sum(http.sent) == cut + len(ARCHIVE) - resumed_at
    assert (tmp_path / "dl" / f"{SHA}.tar.gz").read_bytes() == ARCHIVE
    assert not any(name.endswith(".part") for name in _files(tmp_path / "dl"))
    images = ws / "data/images"
    pulled = {
        f"shapes-1.0/{p.relative_to(images).as_posix()}": p.read_bytes()
        for p in images.rglob("*.png")
    }
    assert pulled == MEMBERS


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "http-checksum-mismatch",
            "the archive's sha256 is not the one in params",
            "exit 1: checksum mismatch, says the file was deleted",
            "no bad archive kept, no data/",
        ).param()
    ],
)
def test_http_checksum_mismatch_is_rejected(case, http, tmp_path):
    ws = write_workspace(tmp_path / "ws", {})
    wrong = hashlib.sha256(b"another archive").hexdigest()
    with pytest.raises(DataSourceError, match=f"checksum mismatch .*got {SHA};.*deleted"):
        _pull(ws, _http_source(http, tmp_path / "dl", sha=wrong))
    assert len(http.requests) == 1
    assert _files(tmp_path / "dl") == []
    assert not (ws / "data").exists()


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "http-path-traversal",
            "an archive with a member named ../../evil.png",
            "exit 1: refused, naming the member",
            "nothing extracted (inside or outside), no data/",
        ).param()
    ],
)
def test_http_path_traversal_is_refused(case, http, tmp_path):
    bad = tar_gz({**MEMBERS, "../../evil.png": png_bytes(seed=666)})
    http.files["/evil.tar.gz"] = bad
    sha = hashlib.sha256(bad).hexdigest()
    ws = write_workspace(tmp_path / "ws", {})
    with pytest.raises(DataSourceError, match=r"refusing .*'\.\./\.\./evil\.png' points outside"):
        _pull(ws, _http_source(http, tmp_path / "dl", path="/evil.tar.gz", sha=sha))
    assert list(tmp_path.rglob("evil.png")) == [] and not (tmp_path.parent / "evil.png").exists()
    # only the downloaded (checked) archive and the URL that served it: no extracted tree, no
    # half-extracted temp folder
    assert _files(tmp_path / "dl") == [f"{sha}.tar.gz", f"{sha}.tar.gz.urls"]
    assert not (ws / "data").exists()


# ------------------------------------------------------------------ S3


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    isolate_aws_env(monkeypatch, tmp_path)


BODIES = {
    f"shapes/{label}/{i:02d}.png": png_bytes(seed=1000 * k + i)
    for k, label in enumerate(("circles", "squares"))
    for i in range(30)
}


def _bucket(server: MotoServer) -> None:
    s3 = server.client()
    s3.create_bucket(Bucket="photos")
    for key, body in BODIES.items():
        s3.put_object(Bucket="photos", Key=key, Body=body)


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


def _s3_source(url: str, endpoint: str, cache: Path, **kw) -> dict:
    return {"kind": "s3", "url": url, "endpoint_url": endpoint, "path": str(cache), **kw}


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "s3-endpoint-down",
            "nothing listens at data.source.endpoint_url",
            "exit 1 after the retries, in seconds, naming the endpoint",
            "no data/, no mirror folder",
        ).param()
    ],
)
def test_s3_endpoint_down_fails_fast(case, tmp_path, caplog):
    endpoint = f"http://127.0.0.1:{free_port()}"
    ws = write_workspace(tmp_path / "ws", {})
    start = time.monotonic()
    with (
        caplog.at_level(logging.DEBUG, logger="botocore.retries.standard"),
        pytest.raises(
            DataSourceError, match=f"cannot reach the S3 endpoint .*{endpoint}.*2 retries"
        ),
    ):
        _pull(ws, _s3_source("s3://photos/shapes", endpoint, tmp_path / "dl", retries=2, timeout=2))
    assert time.monotonic() - start < 10
    retried = [r for r in caplog.records if "Retry needed" in r.getMessage()]
    assert len(retried) == 2
    assert not (ws / "data").exists() and not (tmp_path / "dl").exists()


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "s3-missing-bucket",
            "data.source.url names a bucket that does not exist",
            "exit 1: says the bucket does not exist and to fix data.source.url",
            "no data/, no mirror folder",
        ).param()
    ],
)
def test_s3_missing_bucket(case, moto, tmp_path):
    ws = write_workspace(tmp_path / "ws", {})
    with pytest.raises(
        DataSourceError, match="bucket 'no-such-bucket' does not exist .*fix data.source.url"
    ):
        _pull(ws, _s3_source("s3://no-such-bucket/shapes", moto.url, tmp_path / "dl"))
    assert not (ws / "data").exists() and not (tmp_path / "dl").exists()


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "s3-wrong-credentials",
            "AWS keys the endpoint does not know",
            "exit 1: S3 refused the credentials (InvalidAccessKeyId), says which variables",
            "no data/, no mirror folder; the keys appear nowhere in the message",
        ).param()
    ],
)
def test_s3_wrong_credentials(case, tmp_path, monkeypatch):
    # checks credentials after the one unauthenticated create_bucket
    server = MotoServer(tmp_path, auth_after=1)
    try:
        server.client().create_bucket(Bucket="photos")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-3f9a")
        ws = write_workspace(tmp_path / "ws", {})
        with pytest.raises(DataSourceError) as info:
            _pull(ws, _s3_source("s3://photos/shapes", server.url, tmp_path / "dl"))
    finally:
        server.stop()
    message = str(info.value)
    assert "S3 refused the credentials" in message and "InvalidAccessKeyId" in message
    assert "AWS_ACCESS_KEY_ID" in message
    assert "AKIAWRONGWRONGWRONG1" not in message and "wrong-secret-3f9a" not in message
    assert not (ws / "data").exists() and not (tmp_path / "dl").exists()


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "s3-stopped-mid-pull",
            "the S3 endpoint stops after 20 of 60 downloads",
            "exit 1: cannot reach the S3 endpoint; once it is back, the pull fetches only the rest",
            "the previous dataset (data/ byte for byte), only whole files in the mirror",
        ).param()
    ],
)
def test_s3_stopped_mid_pull(case, tmp_path, monkeypatch, caplog):
    import transferlab.data.s3 as s3_mod

    server = MotoServer(tmp_path)
    try:
        _bucket(server)
        ws = write_workspace(tmp_path / "ws", {})
        first = _s3_source("s3://photos/shapes", server.url, tmp_path / "dl1", workers=4)
        assert _pull(ws, first)["kept"] == {"circles": 30, "squares": 30}
        previous = tree_digest(ws / "data")

        make_client, calls = s3_mod.make_client, []

        def stop_after_20(**_):
            calls.append(1)
            if len(calls) == 20:
                server.stop()

        def client_that_stops_the_server(source):
            client = make_client(source)
            client.meta.events.register("after-call.s3.GetObject", stop_after_20)
            return client

        monkeypatch.setattr(s3_mod, "make_client", client_that_stops_the_server)
        # a fresh mirror, so this pull has to download everything
        second = {**first, "path": str(tmp_path / "dl2"), "retries": 1, "timeout": 1}
        start = time.monotonic()
        with pytest.raises(DataSourceError, match="cannot reach the S3 endpoint"):
            _pull(ws, second)
        assert time.monotonic() - start < 60
    finally:
        server.stop()
    monkeypatch.setattr(s3_mod, "make_client", make_client)
    assert tree_digest(ws / "data") == previous
    mirror = tmp_path / "dl2/photos/shapes"
    files = _files(mirror)
    assert not [f for f in files if f.endswith(".part")]
    kept = [f for f in files if f.endswith(".png")]
    # after-call fires when the headers arrive: up to `workers` bodies were still streaming
    assert 20 - 4 <= len(kept) < len(BODIES)
    for f in kept:
        assert (mirror / f).read_bytes() == BODIES[f"shapes/{f}"]

    # the endpoint is back (same objects, same ETags): only the missing files are downloaded
    server = MotoServer(tmp_path)
    try:
        _bucket(server)
        with caplog.at_level(logging.INFO, logger="transferlab.data.s3"):
            result = _pull(ws, {**second, "endpoint_url": server.url})
    finally:
        server.stop()
    assert result["kept"] == {"circles": 30, "squares": 30}
    (line,) = [r.getMessage() for r in caplog.records if "downloaded" in r.getMessage()]
    assert f"{len(BODIES) - len(kept)} downloaded, {len(kept)} unchanged" in line
    pulled = sorted(p.read_bytes() for p in (ws / "data/images").rglob("*.png"))
    assert pulled == sorted(BODIES.values())
