"""The ``pull`` stage's work: check every image of a source and freeze the usable ones.

Output layout under ``out_dir``::

    images/<class>/<path inside the class>   original bytes of each accepted file
    manifest.csv                              path,label,sha256,width,height,source
    rejected.json                             [{"source": uri, "reason": text}, ...]

The three are replaced together at the end, so a failed run leaves the previous dataset whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from transferlab.config import DataParams, FolderSource
from transferlab.data.images import ImageRejected, decode_rgb
from transferlab.data.manifest import MANIFEST_COLUMNS, write_csv_atomic
from transferlab.data.sources import IMAGE_EXTENSIONS, DataSourceError, SourceFile, list_source
from transferlab.progress import progress

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
REJECTED_NAME = "rejected.json"
IMAGES_DIR = "images"
# Starting a worker process (and importing numpy, Pillow, pydantic in it) costs about as much as
# decoding 16-32 MB of PNG or JPEG in this one, so give each worker at least this many bytes.
_BYTES_PER_WORKER = 32 << 20


@dataclass(frozen=True)
class PullResult:
    """What :func:`pull_dataset` wrote.

    Attributes:
        manifest: ``out_dir / "manifest.csv"``.
        rejected: ``out_dir / "rejected.json"``.
        kept: accepted images per class, for every class that kept at least one.
        n_rejected: number of files rejected.
        empty: classes of the source left without a single usable image (left out).
        small: classes with fewer usable images than ``min_per_class``, with their count.
    """

    manifest: Path
    rejected: Path
    kept: dict[str, int]
    n_rejected: int
    empty: tuple[str, ...] = ()
    small: dict[str, int] | None = None


@dataclass(frozen=True)
class _Job:
    src: str
    dest: str
    min_size: int
    max_pixels: int
    background: tuple[int, int, int]


@dataclass(frozen=True)
class _Checked:
    sha256: str = ""
    width: int = 0
    height: int = 0
    reason: str | None = None


def _check(job: _Job) -> _Checked:
    """Validate one file and, if usable, copy its bytes to ``job.dest`` (runs in a worker).

    Reading the bytes once for hash, decode and copy means the recorded hash is always that of
    the copied bytes, even if the original changes meanwhile.
    """
    try:
        data = Path(job.src).read_bytes()
    except OSError as exc:
        return _Checked(reason=f"unreadable: {exc.strerror or exc}")
    try:
        im = decode_rgb(data, background=job.background, max_pixels=job.max_pixels)
    except ImageRejected as exc:
        return _Checked(reason=exc.reason)
    width, height = im.size
    if min(width, height) < job.min_size:
        return _Checked(
            reason=f"too small: {width}x{height}, shorter side < min_size {job.min_size}"
        )
    dest = Path(job.dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return _Checked(sha256=hashlib.sha256(data).hexdigest(), width=width, height=height)


def _auto_workers(jobs: Sequence[_Job]) -> int:
    total = 0
    for job in jobs:
        with contextlib.suppress(OSError):  # _check reports unreadable files
            total += os.stat(job.src).st_size
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, total // _BYTES_PER_WORKER))


def _run_checks(jobs: Sequence[_Job], workers: int | None) -> Iterator[_Checked]:
    """Results of :func:`_check` in job order, across processes when it pays off."""
    if workers is None:
        workers = _auto_workers(jobs)
    bar = progress(total=len(jobs), desc="checking images", unit="img")
    with bar:
        if workers <= 1:
            for job in jobs:
                yield _check(job)
                bar.update()
            return
        # forkserver, not fork: the caller may run threads (Prefect, MLflow), and forking a
        # threaded process can deadlock the child.
        method = (
            "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        )
        chunksize = max(1, len(jobs) // (workers * 8))
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
        try:
            for result in pool.map(_check, jobs, chunksize=chunksize):
                yield result
                bar.update()
        finally:
            # On an error or Ctrl-C, drop the queued files instead of decoding them all first.
            pool.shutdown(wait=True, cancel_futures=True)


def pull_dataset(
    params: DataParams,
    out_dir: Path,
    *,
    workers: int | None = None,
    min_per_class: int | None = None,
) -> PullResult:
    """Check every image of ``params.source`` and write the dataset to ``out_dir``.

    Each candidate is decoded with :func:`~transferlab.data.images.open_rgb` rules (plus
    ``params.min_size``); byte-identical copies of an earlier file are rejected as duplicates,
    since they would leak between train and test. Accepted files are copied unchanged.

    Args:
        params: the ``data`` section.
        out_dir: where ``images/``, ``manifest.csv`` and ``rejected.json`` go.
        workers: processes for decoding; ``None`` picks from the CPU count and the bytes to
            decode, ``1`` decodes in this process.
        min_per_class: warn about classes with fewer usable images (what the split needs,
            see :func:`~transferlab.data.split.min_class_size`); ``None``: no check.

    Returns:
        Paths written and counts.

    Raises:
        DataSourceError: missing source, no images, or fewer than two classes with usable images.
    """
    out_dir = Path(out_dir)
    root = params.source.path.expanduser().resolve()
    if isinstance(params.source, FolderSource) and out_dir.resolve().is_relative_to(root):
        raise DataSourceError(
            f"output folder {out_dir} is inside data.source.path {root}; its images would become "
            f"a class on the next run: write the dataset elsewhere"
        )
    created, listed = not out_dir.exists(), False
    out_dir.mkdir(parents=True, exist_ok=True)
    # Inside out_dir, so the final renames stay on one filesystem and are atomic.
    tmp = Path(tempfile.mkdtemp(prefix=".pull-", dir=out_dir))
    try:
        files, classes = list_source(params.source, tmp / "src")
        listed = True
        if not files:
            exts = " ".join(sorted(IMAGE_EXTENSIONS))
            found = ", ".join(classes) or "none"
            raise DataSourceError(
                f"no images found under {root} (class folders: {found}); expected "
                f"<class>/<image> files ending in one of: {exts}"
            )
        new = tmp / "new"
        jobs = [
            _Job(
                src=str(f.path),
                dest=str(new / IMAGES_DIR / f.label / f.rel),
                min_size=params.min_size,
                max_pixels=params.max_pixels,
                background=tuple(params.background),
            )
            for f in files
        ]
        (new / IMAGES_DIR).mkdir(parents=True)
        # Finish every worker before going on, so none still writes into tmp if a later step
        # fails and tmp is removed.
        results = list(_run_checks(jobs, workers))
        rows, rejected = _collect(files, results, new)
        kept = Counter(row["label"] for row in rows)
        _summarise(files, classes, kept, rejected)
        empty, small = _check_class_sizes(classes, kept, min_per_class)
        if len(kept) < 2:
            raise DataSourceError(_too_few_classes(root, classes, files, kept, rejected))
        write_csv_atomic(new / MANIFEST_NAME, MANIFEST_COLUMNS, rows)
        (new / REJECTED_NAME).write_text(
            json.dumps(rejected, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        _swap_in(new, tmp / "previous", out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not listed:
            # A source that cannot be listed leaves no trace (out_dir is empty without tmp).
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PullResult(
        manifest=out_dir / MANIFEST_NAME,
        rejected=out_dir / REJECTED_NAME,
        kept=dict(sorted(kept.items())),
        n_rejected=len(rejected),
        empty=empty,
        small=small,
    )


def _collect(
    files: Sequence[SourceFile], results: Sequence[_Checked], new: Path
) -> tuple[list[dict], list[dict[str, str]]]:
    """Manifest rows and rejections, in ``files`` order; drops duplicate copies from ``new``."""
    rows: list[dict] = []
    rejected: list[dict[str, str]] = []
    first_seen: dict[str, dict] = {}
    for f, res in zip(files, results, strict=True):
        path = f"{IMAGES_DIR}/{f.label}/{f.rel.as_posix()}"
        reason = res.reason
        if reason is None and res.sha256 in first_seen:
            first = first_seen[res.sha256]
            reason = f"duplicate: same bytes as {first['path']}"
            (new / path).unlink()
        if reason is not None:
            rejected.append({"source": f.uri, "reason": reason})
            continue
        row = {
            "path": path,
            "label": f.label,
            "sha256": res.sha256,
            "width": res.width,
            "height": res.height,
            "source": f.uri,
        }
        first_seen[res.sha256] = row
        rows.append(row)
    rows.sort(key=lambda r: (r["label"], r["path"]))
    return rows, rejected


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def _summarise(
    files: Sequence[SourceFile],
    classes: Sequence[str],
    kept: Counter[str],
    rejected: Sequence[dict[str, str]],
) -> None:
    by_uri = {f.uri: f.label for f in files}
    rejected_per_class = Counter(by_uri[r["source"]] for r in rejected)
    log.info("kept %d image(s), rejected %d", sum(kept.values()), len(rejected))
    for label in classes:
        log.info("  %-24s kept %5d  rejected %5d", label, kept[label], rejected_per_class[label])
    for kind, n in sorted(Counter(_reason_kind(r["reason"]) for r in rejected).items()):
        log.info("  rejected as %s: %d", kind, n)
    for r in rejected:
        log.debug("rejected %s: %s", r["source"], r["reason"])
    for label in classes:
        if not kept[label]:
            log.warning(
                "class %r has no usable image (%d rejected) and is left out: add images to its "
                "folder or remove it",
                label,
                rejected_per_class[label],
            )


def _check_class_sizes(
    classes: Sequence[str],
    kept: Counter[str],
    min_per_class: int | None,
) -> tuple[tuple[str, ...], dict[str, int]]:
    """Empty classes, and classes too small to split (warned about, with what to do)."""
    # _summarise already warns about each empty class and what to do.
    empty = tuple(c for c in classes if not kept[c])
    small: dict[str, int] = {}
    if min_per_class is not None:
        small = {c: n for c, n in sorted(kept.items()) if n < min_per_class}
        if small:
            listed = ", ".join(f"{c!r}: {n}" for c, n in small.items())
            log.warning(
                "too few usable images for the split in %s (need %d per class with the current "
                "split.val/split.test): add images to those classes, lower split.val/split.test, "
                "or remove the classes",
                listed,
                min_per_class,
            )
    return empty, small


def _too_few_classes(
    root: Path,
    classes: Sequence[str],
    files: Sequence[SourceFile],
    kept: Counter[str],
    rejected: Sequence[dict[str, str]],
) -> str:
    candidates = Counter(f.label for f in files)
    found = ", ".join(
        f"{c}: {kept[c]} of {candidates[c]} usable" if candidates[c] else f"{c}: no image files"
        for c in classes
    )
    reasons = Counter(_reason_kind(r["reason"]) for r in rejected).most_common(3)
    why = f"; rejected as {', '.join(f'{k} ({n})' for k, n in reasons)}" if reasons else ""
    fix = "add a subfolder of images per class"
    if reasons and reasons[0][0] == "too small":
        # MNIST-family sources are 28x28, under the default min_size.
        fix = "lower data.min_size (28 for the MNIST family) or " + fix
    return (
        f"{len(kept)} class(es) with usable images under {root} ({found or 'no class folders'})"
        f"{why}; a classifier needs at least 2: {fix}"
    )


def _swap_in(new: Path, backup: Path, out_dir: Path) -> None:
    """Move the new outputs into ``out_dir``, restoring the previous ones if any step fails.

    Files are replaced by ``os.replace`` (atomic; the old file is kept aside for the rollback).
    A folder cannot be replaced atomically, so ``images/`` is renamed away and the new one
    renamed in: two renames, with no copying in between.
    """
    backup.mkdir()
    undo: list[tuple[Path, Path | None]] = []  # (path, previous version or None: delete it)
    try:
        images = out_dir / IMAGES_DIR
        if images.exists():
            os.replace(images, backup / IMAGES_DIR)
            undo.append((images, backup / IMAGES_DIR))
        else:
            undo.append((images, None))
        os.replace(new / IMAGES_DIR, images)
        # The manifest goes last: it names the dataset, so it must not move ahead of its images.
        for name in (REJECTED_NAME, MANIFEST_NAME):
            target = out_dir / name
            if target.exists():
                _keep_copy(target, backup / name)
                undo.append((target, backup / name))
            else:
                undo.append((target, None))
            os.replace(new / name, target)
    except BaseException:
        for path, previous in reversed(undo):
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif previous is None:
                    path.unlink(missing_ok=True)
                if previous is not None:
                    os.replace(previous, path)
            except OSError:
                log.exception("could not restore %s", path)
        raise


def _keep_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # file systems without hard links
        shutil.copy2(src, dst)
