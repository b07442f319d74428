"""Download an archive over HTTP(S) with resume, retries and a required sha256; extract safely.

The cache folder holds ``<sha256>.<ext>`` (complete, checked), ``<sha256>.<ext>.part`` (an
interrupted download, resumed with an HTTP Range request), ``<sha256>.<ext>.urls`` (the URLs
that served exactly these bytes) and ``<sha256>/`` (the extracted tree, renamed into place only
once complete).

The cached archive is reused only for a URL that has served it before. A new URL is always
contacted and its bytes checked against ``sha256``, so a source pointed at a dead link or at a
corrupt copy fails even when an archive with that sha256 is cached, and the manifest never names
a URL that was not seen to serve the data.

Archives are bounded before extraction: at most :data:`MAX_MEMBERS` members, and the sizes they
declare must fit in the free space of the cache's disk (zip and tar report them up front).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from transferlab.atomic import atomic_write
from transferlab.data.files import DataSourceError
from transferlab.progress import progress

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
MAX_MEMBERS = 2_000_000
# Left free after extraction, so that the pull's own copy of the images still fits.
_FREE_MARGIN = 1 << 30
_CHUNK = 1 << 16
# Client errors other than these will not go away by asking again.
_RETRYABLE_4XX = frozenset({408, 425, 429})


def archive_suffix(url: str) -> str:
    """The archive type from the URL's path, or :class:`DataSourceError`."""
    name = PurePosixPath(urllib.request.urlparse(url).path).name.lower()
    for suffix in ARCHIVE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise DataSourceError(
        f"data.source.url {url!r} does not end in one of {', '.join(ARCHIVE_SUFFIXES)}"
    )


def download(
    url: str, sha256: str, cache: Path, *, retries: int = 5, timeout: float = 30.0
) -> Path:
    """Fetch ``url`` into ``cache`` and check its sha256; reuse a checked copy if present.

    Args:
        url: http(s) URL of the archive.
        sha256: expected hex digest of the whole file.
        cache: folder for the download.
        retries: further attempts after a failed one, waiting 0.5, 1, 2, ... s (capped at 8 s);
            each attempt resumes from the bytes already received.
        timeout: seconds without data before an attempt fails.

    Returns:
        Path of the complete, checked file.

    Raises:
        DataSourceError: HTTP error or connection failure after the retries, or a checksum
            mismatch (the bad file is deleted).
    """
    sha256 = sha256.lower()
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / f"{sha256}{archive_suffix(url)}"
    served = final.with_name(final.name + ".urls")
    if final.is_file() and url in _served_by(served):
        return final
    part = final.with_name(final.name + ".part")
    last: str = ""
    for attempt in range(retries + 1):
        if attempt:
            delay = min(8.0, 0.5 * 2 ** (attempt - 1))
            log.warning("download of %s failed (%s); retry %d in %.1fs", url, last, attempt, delay)
            time.sleep(delay)
        try:
            _fetch(url, part, timeout)
            break
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code} {exc.reason}"
            if 400 <= exc.code < 500 and exc.code not in _RETRYABLE_4XX:
                part.unlink(missing_ok=True)
                raise DataSourceError(
                    f"cannot download {url}: {last}; check data.source.url"
                ) from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            last = str(getattr(exc, "reason", exc))
    else:
        kept = (
            f"the partial file {part} ({part.stat().st_size} bytes) is kept and the next pull "
            "resumes it"
            if part.is_file() and part.stat().st_size
            else "nothing was received"
        )
        raise DataSourceError(
            f"cannot download {url} after {retries + 1} attempts: {last}; {kept}; check "
            "data.source.url and the network"
        )
    digest = _sha256(part)
    if digest != sha256:
        part.unlink()
        raise DataSourceError(
            f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest}; the file was "
            f"deleted. Fix data.source.sha256 if the archive changed on purpose"
        )
    os.replace(part, final)
    _write_served_by(served, {*_served_by(served), url})
    return final


def _served_by(path: Path) -> set[str]:
    try:
        urls = json.loads(path.read_text(encoding="utf-8"))
        return {u for u in urls if isinstance(u, str)}
    except (OSError, ValueError, TypeError):
        return set()


def _write_served_by(path: Path, urls: set[str]) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(sorted(urls), f, indent=1)


def _fetch(url: str, part: Path, timeout: float) -> None:
    """One attempt: append to ``part`` from where it stops (Range), until the end."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            # Our part is already whole (or longer than the file): start over to be sure.
            part.unlink()
        raise
    with resp:
        if have and resp.status != 206:
            have = 0  # the server ignored Range: it sends the whole file again
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        mode = "ab" if have else "wb"
        with (
            open(part, mode) as f,
            progress(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                desc=f"downloading {PurePosixPath(url).name}",
            ) as bar,
        ):
            got = 0
            while chunk := resp.read(_CHUNK):
                f.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
        if length is not None and got < int(length):
            raise OSError(f"connection closed after {have + got} of {total} bytes")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def extract(archive: Path, dest: Path) -> Path:
    """Extract ``archive`` to ``dest`` (once; an existing ``dest`` is reused).

    Members with absolute paths, ``..`` components, links pointing outside ``dest``, device
    files or FIFOs make the whole archive refused.

    Returns:
        ``dest``.

    Raises:
        DataSourceError: an unsafe or unreadable archive; nothing is left at ``dest``.
    """
    if dest.is_dir():
        return dest
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        if archive.name.endswith(".zip"):
            _extract_zip(archive, tmp)
        else:
            _extract_tar(archive, tmp)
        os.replace(tmp, dest)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise DataSourceError(f"cannot extract {archive}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _safe_member(name: str, archive: Path) -> PurePosixPath:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise DataSourceError(f"refusing {archive}: member {name!r} points outside the folder")
    return p


def _check_expansion(archive: Path, out: Path, sizes: list[int]) -> None:
    """Refuse an archive with too many members or more bytes than the disk has room for."""
    if len(sizes) > MAX_MEMBERS:
        raise DataSourceError(
            f"refusing {archive}: {len(sizes)} members, more than {MAX_MEMBERS}; split the data"
        )
    total, free = sum(sizes), shutil.disk_usage(out).free
    if total > free - _FREE_MARGIN:
        raise DataSourceError(
            f"refusing {archive}: it expands to {total / 1e9:.1f} GB but {out} has "
            f"{free / 1e9:.1f} GB free (1 GB kept spare); free space or move data.source.path"
        )


def _extract_tar(archive: Path, out: Path) -> None:
    with tarfile.open(archive) as tar:
        members = []
        for m in tar:  # stops reading the member list early if it is too long
            members.append(m)
            if len(members) > MAX_MEMBERS:
                break
        _check_expansion(archive, out, [m.size for m in members])
        for m in members:
            p = _safe_member(m.name, archive)
            if m.issym() or m.islnk():
                target = PurePosixPath(m.linkname)
                # Symlinks resolve from their own folder, hard links from the archive root.
                base = p.parent if m.issym() else PurePosixPath()
                joined = os.path.normpath(str(base / target))
                if target.is_absolute() or joined == ".." or joined.startswith("../"):
                    raise DataSourceError(
                        f"refusing {archive}: link {m.name!r} -> {m.linkname!r} points outside "
                        f"the folder"
                    )
            elif not (m.isfile() or m.isdir()):
                raise DataSourceError(f"refusing {archive}: {m.name!r} is a device or FIFO")
        # The "data" filter (Python >= 3.12, backported to 3.11.4) re-checks all of the above.
        tar.extractall(out, members=members, filter="data")


def _extract_zip(archive: Path, out: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        # zipfile stops reading a member at its declared size, so these sizes hold
        _check_expansion(archive, out, [info.file_size for info in zf.infolist()])
        for info in zf.infolist():
            _safe_member(info.filename, archive)
            # A zip entry with the Unix symlink mode would become a link on other extractors;
            # zipfile writes it as a small file, so it cannot point anywhere.
        zf.extractall(out)


def archive_root(tree: Path, root: str) -> Path:
    """The folder whose subfolders are the classes: ``tree/root``, or a single top folder."""
    if root:
        top = tree / _safe_member(root, tree)
        if not top.is_dir():
            raise DataSourceError(f"data.source.root {root!r} is not a folder in the archive")
        return top
    entries = [e for e in tree.iterdir() if not e.name.startswith(".") and e.name != "__MACOSX"]
    # Archives usually wrap everything in one folder named like the archive; classes sit below.
    if len(entries) == 1 and entries[0].is_dir():
        inner = [e for e in entries[0].iterdir() if e.is_dir() and not e.name.startswith(".")]
        if inner:
            return entries[0]
    return tree
