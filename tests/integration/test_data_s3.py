"""S3 prefix source: boto3 against moto_server on 127.0.0.1."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.helpers import png_bytes
from tests.integration.moto import MotoServer, isolate_aws_env
from transferlab.config import DataParams, S3Source
from transferlab.data import DataSourceError, pull_dataset, read_manifest
from transferlab.data.s3 import INDEX_NAME, make_client, sync_prefix

pytestmark = pytest.mark.integration

# More than one page of list_objects_v2 (1,000 keys).
N_PER_CLASS = {"cats": 520, "dogs": 481}


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    isolate_aws_env(monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    s3 = server.client()
    s3.create_bucket(Bucket="photos")
    bodies = {
        f"pets/v1/{label}/img{i:04d}.png": png_bytes(seed=hash(label) % 1000 * 10_000 + i)
        for label, n in N_PER_CLASS.items()
        for i in range(n)
    }
    bodies["pets/v1/notes.txt"] = b"not in a class"
    bodies["pets/v1/cats/.DS_Store"] = b"junk"
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda kv: s3.put_object(Bucket="photos", Key=kv[0], Body=kv[1]), bodies.items()
            )
        )
    server.bodies = bodies
    yield server
    server.stop()


def _source(server: MotoServer, cache: Path, **kw) -> S3Source:
    return S3Source(url="s3://photos/pets/v1", endpoint_url=server.url, path=cache, workers=8, **kw)


@pytest.mark.slow
def test_pull_paginates_and_second_pull_downloads_nothing(moto, tmp_path: Path) -> None:
    source = _source(moto, tmp_path / "dl")
    result = pull_dataset(DataParams(source=source), tmp_path / "out")
    assert result.kept == N_PER_CLASS
    rows = read_manifest(result.manifest)
    assert len(rows) == sum(N_PER_CLASS.values())
    for r in rows[::97]:
        key = r["source"].removeprefix("s3://photos/")
        assert (tmp_path / "out" / r["path"]).read_bytes() == moto.bodies[key]
    again = sync_prefix(source)
    assert (again.downloaded, again.skipped) == (0, sum(N_PER_CLASS.values()))
    # A changed object (new ETag) is fetched again, and only it.
    client = moto.client()
    client.put_object(Bucket="photos", Key="pets/v1/cats/img0000.png", Body=png_bytes(999_999))
    try:
        third = sync_prefix(source)
        assert third.downloaded == 1
        local = third.root / "cats" / "img0000.png"
        assert local.read_bytes() == png_bytes(999_999)
    finally:
        client.put_object(
            Bucket="photos",
            Key="pets/v1/cats/img0000.png",
            Body=moto.bodies["pets/v1/cats/img0000.png"],
        )


def test_missing_bucket_is_a_clear_error(moto, tmp_path: Path) -> None:
    source = S3Source(url="s3://no-such-bucket/x", endpoint_url=moto.url, path=tmp_path / "dl")
    with pytest.raises(DataSourceError, match="bucket 'no-such-bucket' does not exist"):
        pull_dataset(DataParams(source=source), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "dl").exists()


def test_wrong_credentials_are_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    # A second server that checks credentials after the one unauthenticated create_bucket.
    server = MotoServer(tmp_path, auth_after=1)
    try:
        server.client().create_bucket(Bucket="photos")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        source = _source(server, tmp_path / "dl")
        with pytest.raises(DataSourceError, match="refused the credentials.*InvalidAccessKeyId"):
            pull_dataset(DataParams(source=source), tmp_path / "out")
    finally:
        server.stop()


def test_server_stopped_mid_pull(tmp_path: Path) -> None:
    server = MotoServer(tmp_path)
    bodies = {
        f"set/{c}/{i:03d}.png": png_bytes(i + 1000 * k)
        for k, c in enumerate("ab")
        for i in range(60)
    }
    try:
        s3 = server.client()
        s3.create_bucket(Bucket="photos")
        for key, body in bodies.items():
            s3.put_object(Bucket="photos", Key=key, Body=body)
        source = S3Source(
            url="s3://photos/set",
            endpoint_url=server.url,
            path=tmp_path / "dl",
            workers=4,
            retries=1,
            timeout=1,
        )
        # A first, complete dataset that the failed pull must leave whole.
        first = pull_dataset(DataParams(source=source), tmp_path / "out")
        manifest_before = first.manifest.read_bytes()
        for p in (tmp_path / "dl").rglob("*.png"):
            p.unlink()  # so the next pull has to download again
        client = make_client(source)
        calls = {"n": 0}

        def stop_after_some(**_):
            calls["n"] += 1
            if calls["n"] == 20:
                server.stop()

        client.meta.events.register("after-call.s3.GetObject", stop_after_some)
        with pytest.raises(DataSourceError, match="cannot reach the S3 endpoint"):
            sync_prefix(source, client=client)
        mirror = tmp_path / "dl" / "photos" / "set"
        # Nothing half-written: every file present is complete, no temporaries are left.
        assert not list(mirror.rglob("*.part"))
        present = list(mirror.rglob("*.png"))
        # after-call fires once headers arrive; up to `workers` bodies were still streaming when
        # the server stopped, so those may be lost, but every earlier download must be kept.
        assert 20 - source.workers <= len(present) < len(bodies)
        for p in present:
            assert p.read_bytes() == bodies[f"set/{p.parent.name}/{p.name}"]
        # The pull stage with the server gone: a clear error, the previous dataset untouched.
        with pytest.raises(DataSourceError, match="cannot reach the S3 endpoint"):
            pull_dataset(DataParams(source=source), tmp_path / "out")
        assert first.manifest.read_bytes() == manifest_before
        assert len(list((tmp_path / "out" / "images").rglob("*.png"))) == len(bodies)
        assert (mirror / INDEX_NAME).is_file()
    finally:
        server.stop()
