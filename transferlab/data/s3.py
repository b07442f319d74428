"""Mirror an S3 prefix into a local cache folder: ``<cache>/<class>/<rest of the key>``.

Credentials come from boto3's standard chain (environment, shared profile, instance role). Each
object is downloaded to a temporary name and renamed into place, so a failed run never leaves a
half-written file under a real name. ``.s3-index.json`` remembers the size and ETag of each file;
an object whose size and ETag are unchanged is not downloaded again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from transferlab.atomic import atomic_write
from transferlab.config import S3Source
from transferlab.data.files import IMAGE_EXTENSIONS, DataSourceError, is_junk
from transferlab.names import UnsafeName, data_path
from transferlab.progress import progress

log = logging.getLogger(__name__)

INDEX_NAME = ".s3-index.json"
_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "403"}
)


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str
    label: str
    rel: PurePosixPath


@dataclass(frozen=True)
class SyncResult:
    """What :func:`sync_prefix` did.

    Attributes:
        root: the local mirror (class folders inside).
        classes: class names (prefix levels), sorted.
        downloaded: objects fetched this time.
        skipped: objects already present with the same size and ETag.
    """

    root: Path
    classes: list[str]
    downloaded: int
    skipped: int
    objects: list[S3Object]
    # (key, reason) of image objects whose key no local file may be named after; not downloaded
    refused: tuple[tuple[str, str], ...] = ()


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b/")`` (the prefix ends in a slash, or is empty)."""
    u = urlparse(url)
    prefix = u.path.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return u.netloc, prefix


def make_client(source: S3Source):
    """A boto3 S3 client: standard credential chain, bounded retries and timeouts."""
    import boto3
    from botocore.config import Config

    config = Config(
        # total_max_attempts counts the first request; max_attempts would count only retries
        retries={"total_max_attempts": source.retries + 1, "mode": "standard"},
        connect_timeout=source.timeout,
        read_timeout=source.timeout,
        max_pool_connections=max(10, source.workers),
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=source.endpoint_url, region_name=source.region, config=config
    )


def _explain(exc: Exception, source: S3Source) -> DataSourceError:
    """One line that says what went wrong and what to do."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    where = source.url + (f" at {source.endpoint_url}" if source.endpoint_url else "")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return DataSourceError(
            f"no AWS credentials for {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            f"AWS_PROFILE, or run where an instance role applies"
        )
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket", "404"):
            bucket, _ = parse_url(source.url)
            return DataSourceError(
                f"bucket {bucket!r} does not exist ({where}); fix data.source.url"
            )
        if code in _CREDENTIAL_CODES:
            return DataSourceError(
                f"S3 refused the credentials for {where} ({code}); check AWS_ACCESS_KEY_ID/"
                f"AWS_SECRET_ACCESS_KEY or AWS_PROFILE and the bucket's permissions"
            )
        return DataSourceError(f"S3 error for {where}: {code}: {exc}")
    if isinstance(exc, EndpointConnectionError):
        return DataSourceError(
            f"cannot reach the S3 endpoint for {where} after {source.retries} retries: {exc}; "
            f"check data.source.endpoint_url and the network"
        )
    return DataSourceError(f"S3 transfer from {where} failed after retries: {exc}")


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _list(
    client, bucket: str, prefix: str
) -> tuple[list[S3Object], list[str], list[tuple[str, str]]]:
    objects: list[S3Object] = []
    classes: set[str] = set()
    refused: list[tuple[str, str]] = []
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        for obj in page.get("Contents", []):
            rest = obj["Key"][len(prefix) :]
            if rest.endswith("/") or not _is_image_name(rest):
                continue  # "folder" markers, text files: not worth the download
            try:
                # The local name is built from the key: "prefix//abs/x.png" or "a/../../x.png"
                # must not become a path outside the cache.
                parts = data_path(rest).parts
            except UnsafeName as exc:
                log.warning("not downloading s3://%s/%s: %s", bucket, obj["Key"], exc.reason)
                refused.append((obj["Key"], f"unsafe name: {exc}"))
                continue
            if len(parts) < 2 or any(is_junk(p) for p in parts):
                continue  # objects at the prefix root have no class; .DS_Store, __MACOSX/
            classes.add(parts[0])
            objects.append(
                S3Object(
                    key=obj["Key"],
                    size=int(obj["Size"]),
                    etag=obj["ETag"].strip('"'),
                    label=parts[0],
                    rel=PurePosixPath(*parts[1:]),
                )
            )
    return objects, sorted(classes), refused


def sync_prefix(source: S3Source, *, client=None) -> SyncResult:
    """Download every object under ``source.url`` that is new or changed into ``source.path``.

    Args:
        source: the ``data.source`` section (kind ``s3``).
        client: a boto3 S3 client; default :func:`make_client`.

    Returns:
        The mirror's folder and counts.

    Raises:
        DataSourceError: wrong credentials, missing bucket, unreachable endpoint after the
            retries; files already complete stay, nothing half-written is left.
    """
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    bucket, prefix = parse_url(source.url)
    root = Path(source.path).expanduser().resolve() / bucket / prefix
    client = client or make_client(source)
    try:
        objects, classes, refused = _list(client, bucket, prefix)
    except (BotoCoreError, ClientError) as exc:
        raise _explain(exc, source) from exc
    root.mkdir(parents=True, exist_ok=True)
    index_path = root / INDEX_NAME
    index = _read_index(index_path)
    todo = []
    for o in objects:
        local = root / o.label / o.rel
        seen = index.get(o.key)
        if seen == [o.size, o.etag] and local.is_file() and local.stat().st_size == o.size:
            continue
        todo.append(o)
    lock = threading.Lock()
    bar = progress(total=len(todo), desc="downloading from S3", unit="obj")

    def fetch(o: S3Object) -> None:
        local = root / o.label / o.rel
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{threading.get_ident()}.part")
        try:
            # One GetObject per file: download_file would add a HeadObject and start a thread
            # pool per call, which doubles the requests for small images.
            for attempt in range(source.retries + 1):
                try:
                    body = client.get_object(Bucket=bucket, Key=o.key)["Body"]
                    with body, open(tmp, "wb") as f:
                        for chunk in body.iter_chunks(1 << 20):
                            f.write(chunk)
                    break
                except (IncompleteReadError, ResponseStreamingError, ReadTimeoutError):
                    # botocore retries the request, not a body cut mid-stream: ask again.
                    if attempt == source.retries:
                        raise
            if tmp.stat().st_size != o.size:
                raise DataSourceError(
                    f"s3://{bucket}/{o.key}: got {tmp.stat().st_size} bytes, listed {o.size}"
                )
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        with lock:
            index[o.key] = [o.size, o.etag]
            bar.update()

    try:
        with bar, ThreadPoolExecutor(source.workers) as pool:
            futures = [pool.submit(fetch, o) for o in todo]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for f in pending:
                f.cancel()
            wait(futures)
            for f in futures:
                if not f.cancelled() and f.exception() is not None:
                    exc = f.exception()
                    if isinstance(exc, DataSourceError):
                        raise exc
                    if isinstance(exc, BotoCoreError | ClientError | OSError):
                        raise _explain(exc, source) from exc
                    raise exc
    finally:
        # Whatever finished is complete and correct: remember it, so a rerun skips it.
        _write_index(index_path, index)
    log.info(
        "S3 %s: %d object(s), %d downloaded, %d unchanged",
        source.url,
        len(objects),
        len(todo),
        len(objects) - len(todo),
    )
    return SyncResult(
        root=root,
        classes=classes,
        downloaded=len(todo),
        skipped=len(objects) - len(todo),
        objects=objects,
        refused=tuple(refused),
    )


def _read_index(path: Path) -> dict[str, list]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_index(path: Path, index: dict[str, list]) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(index, f, sort_keys=True)
