"""HTTP(S) archive source against a real HTTP server on 127.0.0.1 started by the test."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.integration.helpers import ArchiveServer, png_bytes, tar_gz, zip_bytes
from transferlab.config import DataParams, HttpSource
from transferlab.data import DataSourceError, pull_dataset, read_manifest
from transferlab.data import http as http_mod

pytestmark = pytest.mark.integration

MEMBERS = {
    f"flowers-1.0/{label}/{i}.png": png_bytes(seed=k * 10 + i)
    for k, label in enumerate(["daisy", "rose tea"])
    for i in range(4)
}
MEMBERS["flowers-1.0/README.txt"] = b"two classes\n"


@pytest.fixture
def server():
    s = ArchiveServer()
    yield s
    s.close()


def _params(url: str, sha: str, cache: Path, **kw) -> DataParams:
    return DataParams(source=HttpSource(url=url, sha256=sha, path=cache, retries=2, **kw))


def test_good_archive_is_accepted(server, tmp_path: Path) -> None:
    data = tar_gz(MEMBERS)
    server.files["/flowers.tar.gz"] = data
    sha = hashlib.sha256(data).hexdigest()
    result = pull_dataset(
        _params(server.url + "/flowers.tar.gz", sha, tmp_path / "dl"), tmp_path / "out"
    )
    assert result.kept == {"daisy": 4, "rose tea": 4}
    rows = read_manifest(result.manifest)
    assert {r["source"] for r in rows} == {
        f"{server.url}/flowers.tar.gz#{r['label']}/{Path(r['path']).name}" for r in rows
    }
    for r in rows:
        member = f"flowers-1.0/{r['label']}/{Path(r['path']).name}"
        assert (tmp_path / "out" / r["path"]).read_bytes() == MEMBERS[member]
    # A second pull uses the checked copy: no new request.
    n = len(server.requests)
    pull_dataset(_params(server.url + "/flowers.tar.gz", sha, tmp_path / "dl"), tmp_path / "out2")
    assert len(server.requests) == n


def test_zip_archive_is_accepted(server, tmp_path: Path) -> None:
    data = zip_bytes(MEMBERS)
    server.files["/flowers.zip"] = data
    sha = hashlib.sha256(data).hexdigest()
    result = pull_dataset(
        _params(server.url + "/flowers.zip", sha, tmp_path / "dl"), tmp_path / "out"
    )
    assert result.kept == {"daisy": 4, "rose tea": 4}


def test_wrong_sha_is_rejected_and_nothing_is_left(server, tmp_path: Path) -> None:
    server.files["/flowers.tgz"] = tar_gz(MEMBERS)
    with pytest.raises(DataSourceError, match="checksum mismatch.*deleted"):
        pull_dataset(
            _params(server.url + "/flowers.tgz", "0" * 64, tmp_path / "dl"), tmp_path / "out"
        )
    assert list((tmp_path / "dl").iterdir()) == []
    assert not (tmp_path / "out").exists()


def test_cut_connection_is_resumed_to_a_correct_file(server, tmp_path: Path) -> None:
    data = tar_gz(MEMBERS)
    server.files["/flowers.tar"] = data
    server.cut_after = len(data) // 3
    sha = hashlib.sha256(data).hexdigest()
    path = http_mod.download(server.url + "/flowers.tar", sha, tmp_path / "dl", retries=2)
    assert path.read_bytes() == data
    # First request from 0, the second resumes where the cut left off.
    assert server.requests == [("/flowers.tar", None), ("/flowers.tar", f"bytes={len(data) // 3}-")]
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == [path.name, path.name + ".urls"]


@pytest.mark.parametrize(("status", "attempts"), [(404, 1), (500, 3)])
def test_http_errors_are_clear_after_retries(server, tmp_path: Path, status, attempts) -> None:
    server.status["/gone.tar.gz"] = status
    with pytest.raises(DataSourceError, match=f"HTTP {status}") as info:
        http_mod.download(server.url + "/gone.tar.gz", "0" * 64, tmp_path / "dl", retries=2)
    assert "gone.tar.gz" in str(info.value)
    # 404 will not change by asking again; 500 gets the retries.
    assert len(server.requests) == attempts
    assert not any(p.suffix == ".part" and p.stat().st_size for p in (tmp_path / "dl").iterdir())


def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    from tests.integration.helpers import free_port

    url = f"http://127.0.0.1:{free_port()}/x.zip"
    with pytest.raises(DataSourceError, match="after 2 attempts") as info:
        http_mod.download(url, "0" * 64, tmp_path / "dl", retries=1)
    # nothing was received, so no partial file is promised
    assert "nothing was received" in str(info.value) and ".part" not in str(info.value)
    assert not list((tmp_path / "dl").glob("*.part"))


@pytest.mark.parametrize("fault", ["404", "corrupt"])
def test_a_new_url_is_contacted_even_when_its_sha256_is_cached(server, tmp_path, fault) -> None:
    data = tar_gz(MEMBERS)
    sha = hashlib.sha256(data).hexdigest()
    server.files["/flowers.tar.gz"] = data
    pull_dataset(_params(server.url + "/flowers.tar.gz", sha, tmp_path / "dl"), tmp_path / "out")
    manifest = (tmp_path / "out" / "manifest.csv").read_bytes()
    if fault == "404":
        server.status["/moved.tar.gz"] = 404
        match = "HTTP 404"
    else:
        server.files["/moved.tar.gz"] = data[:-100] + bytes(100)
        match = "checksum mismatch"
    with pytest.raises(DataSourceError, match=match):
        pull_dataset(_params(server.url + "/moved.tar.gz", sha, tmp_path / "dl"), tmp_path / "out")
    assert ("/moved.tar.gz", None) in server.requests
    # the dataset, and the URL its manifest names, are the good pull's
    assert (tmp_path / "out" / "manifest.csv").read_bytes() == manifest
    # the archive served by the first URL is still cached and reused without a request
    server.requests.clear()
    pull_dataset(_params(server.url + "/flowers.tar.gz", sha, tmp_path / "dl"), tmp_path / "out")
    assert server.requests == []


def _tar_with(member_kind: str) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("ok/a.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
        if member_kind == "traversal":
            info = tarfile.TarInfo("../../evil.png")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
        elif member_kind == "absolute":
            info = tarfile.TarInfo("/tmp/evil.png")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
        elif member_kind == "symlink":
            info = tarfile.TarInfo("ok/link.png")
            info.type = tarfile.SYMTYPE
            info.linkname = "../../../etc/passwd"
            tar.addfile(info)
        elif member_kind == "hardlink":
            info = tarfile.TarInfo("ok/hard.png")
            info.type = tarfile.LNKTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["traversal", "absolute", "symlink", "hardlink"])
def test_unsafe_tar_is_refused(tmp_path: Path, kind: str) -> None:
    archive = tmp_path / "bad.tar"
    archive.write_bytes(_tar_with(kind))
    with pytest.raises(DataSourceError, match="refusing"):
        http_mod.extract(archive, tmp_path / "tree")
    assert not (tmp_path / "tree").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar"]


def test_unsafe_zip_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "bad.zip"
    archive.write_bytes(zip_bytes({"ok/a.png": b"abc", "../evil.png": b"abc"}))
    with pytest.raises(DataSourceError, match="refusing"):
        http_mod.extract(archive, tmp_path / "tree")
    assert not (tmp_path.parent / "evil.png").exists()


def test_symlink_inside_the_tree_is_allowed(tmp_path: Path) -> None:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("ok/a.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
        info = tarfile.TarInfo("ok/b.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "a.png"
        tar.addfile(info)
    archive = tmp_path / "fine.tar"
    archive.write_bytes(buf.getvalue())
    tree = http_mod.extract(archive, tmp_path / "tree")
    assert (tree / "ok" / "b.png").read_bytes() == b"abc"
