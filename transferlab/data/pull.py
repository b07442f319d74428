"""The ``pull`` stage's work: check every image of a source and freeze the usable ones.

Output layout under ``out_dir``::

    images/<class>/<path inside the class>   original bytes of each accepted file
    manifest.csv                              path,label,sha256,width,height,source
    rejected.json                             [{"source": uri, "reason": text}, ...]
    pull-index.json                           what each source file gave last time (below)

The three are replaced together at the end, so a failed run leaves the previous dataset whole.

The pull is incremental. ``pull-index.json`` records, per source file, its size, mtime and
sha256 and the outcome (accepted with its size in pixels, or the reason for rejecting it), plus
the size and mtime of the copy under ``images/``. A file whose size and mtime are unchanged, and
whose copy is untouched, is hard-linked into the new dataset without being read; a file read
again (a source converted afresh each run, like IDX) whose sha256 is unchanged is not decoded
again. Anything else is checked in full. The index only ever saves work: a missing, stale or
damaged index means a full check, never a different dataset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import socket
import stat
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from transferlab.config import DataParams, FolderSource
from transferlab.data.images import ImageRejected, decode_rgb
from transferlab.data.manifest import LABELLED, MANIFEST_COLUMNS, read_manifest, write_csv_atomic
from transferlab.data.sources import IMAGE_EXTENSIONS, DataSourceError, SourceFile, list_source
from transferlab.names import UnsafeName, data_name, data_path_text
from transferlab.progress import progress

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
REJECTED_NAME = "rejected.json"
IMAGES_DIR = "images"
INDEX_NAME = "pull-index.json"
_INDEX_VERSION = 1
# Temporary folders of a pull in progress: out_dir/.pull-<random>/, with an owner file naming the
# process, so that a later pull can remove those a killed pull left behind.
_TMP_PREFIX = ".pull-"
_OWNER = "owner.json"
# A temporary folder without an owner file (written right after the folder is made) is someone
# else's only in its first moments.
_UNOWNED_GRACE_S = 3600.0
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
class _Checked:
    """The outcome for one source file; ``reason`` set means rejected."""

    sha256: str = ""
    width: int = 0
    height: int = 0
    reason: str | None = None
    size: int = -1  # the source file's size and mtime when it was read (-1: not read)
    mtime_ns: int = -1
    copy_mtime_ns: int = -1  # mtime of the copy under images/ (accepted files)


@dataclass(frozen=True)
class _Job:
    src: str
    dest: str
    min_size: int
    max_pixels: int
    max_bytes: int
    background: tuple[int, int, int]
    # what the index says these bytes gave last time: if the sha256 still matches, no decode
    known: _Checked | None = None


def _check(job: _Job) -> _Checked:
    """Validate one file and, if usable, copy its bytes to ``job.dest`` (runs in a worker).

    Reading the bytes once for hash, decode and copy means the recorded hash is always that of
    the copied bytes, even if the original changes meanwhile. The size is judged from the file's
    metadata before it is read, so a huge (or sparse, or endless) file costs nothing.
    """
    try:
        # stat follows links: those left in the listing stay inside the source (sources.py)
        st = os.stat(job.src)
        if not stat.S_ISREG(st.st_mode):
            return _Checked(reason="not a regular file (a device, FIFO or socket)")
        if st.st_size > job.max_bytes:
            return _Checked(
                reason=f"too large: {st.st_size} bytes > data.max_bytes {job.max_bytes}"
            )
        with open(job.src, "rb") as f:
            data = f.read(job.max_bytes + 1)
    except OSError as exc:
        return _Checked(reason=f"unreadable: {exc.strerror or exc}")
    except MemoryError:
        return _Checked(reason="unreadable: out of memory while reading")
    if len(data) > job.max_bytes:  # it grew after the stat
        return _Checked(reason=f"too large: over data.max_bytes {job.max_bytes} bytes")
    sha = hashlib.sha256(data).hexdigest()
    read = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
    known = job.known
    if known is not None and known.sha256 == sha:
        checked = dataclasses.replace(known, **read)  # same bytes: same verdict, no decode
    else:
        checked = _Checked(**read, **_judge(data, job))
    if checked.reason is None:
        dest = Path(job.dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        checked = dataclasses.replace(checked, copy_mtime_ns=dest.stat().st_mtime_ns)
    return checked


def check_image_bytes(
    data: bytes, *, min_size: int, max_pixels: int, background: tuple[int, int, int]
) -> tuple[int, int]:
    """Pull's rules for one image's bytes (``label suggest|import`` apply them too).

    Returns:
        (width, height) of the decoded image.

    Raises:
        ImageRejected: with the reason (not an image, corrupt, too many pixels, too small).
    """
    im = decode_rgb(data, background=background, max_pixels=max_pixels)
    width, height = im.size
    # Pixel count, not the shorter side: a 400x30 banner is as usable as a 110x110 photo
    # once the backbone has resized it.
    if width * height < min_size**2:
        raise ImageRejected(
            f"too small: {width}x{height} = {width * height} pixels < min_size^2 = {min_size**2}"
        )
    return width, height


def _judge(data: bytes, job: _Job) -> dict:
    """Decode ``data``: its size in pixels, or why it is refused."""
    try:
        width, height = check_image_bytes(
            data, min_size=job.min_size, max_pixels=job.max_pixels, background=job.background
        )
    except ImageRejected as exc:
        return {"reason": exc.reason}
    return {"width": width, "height": height}


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
    labelled: Path | None = None,
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
        labelled: a ``<class>/<image>`` folder of labels returned by ``label import``, merged in
            under ``images/<class>/labelled/`` (checked like the source's images); may be absent.

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
    with _no_cycle_collection():
        return _pull(params, out_dir, root, created, listed, workers, min_per_class, labelled)


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Pause Python's cycle collector: it rescans every object made so far each time enough
    new ones appear, and a pull makes several per file (30% of an incremental pull of 30,000
    images). Nothing here builds cycles; reference counting still frees everything."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _pull(
    params: DataParams,
    out_dir: Path,
    root: Path,
    created: bool,
    listed: bool,
    workers: int | None,
    min_per_class: int | None,
    labelled: Path | None,
) -> PullResult:
    remove_stale_tmp(out_dir)
    # Inside out_dir, so the final renames stay on one filesystem and are atomic.
    tmp = _make_tmp(out_dir)
    try:
        files, classes = list_source(params.source, tmp / "src")
        if labelled is not None and labelled.is_dir():
            extra, extra_classes = list_source(FolderSource(path=labelled))
            files += [dataclasses.replace(f, rel=PurePosixPath(LABELLED) / f.rel) for f in extra]
            classes = sorted(set(classes) | set(extra_classes))
        listed = True
        if not files:
            exts = " ".join(sorted(IMAGE_EXTENSIONS))
            found = ", ".join(classes) or "none"
            raise DataSourceError(
                f"no images found under {root} (class folders: {found}); expected "
                f"<class>/<image> files ending in one of: {exts}"
            )
        files = _named(files)
        new = tmp / "new"
        (new / IMAGES_DIR).mkdir(parents=True)
        rules = _rules(params)
        # Finish every worker before going on, so none still writes into tmp if a later step
        # fails and tmp is removed.
        index = _read_index(out_dir, rules)
        results, kept_copies = _check_all(files, params, new, out_dir, index, workers)
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
        _write_index(new / INDEX_NAME, rules, files, results)
        if kept_copies and not _replaces_a_copy(new, out_dir):
            _update_in_place(new, tmp / "previous", out_dir, {row["path"] for row in rows})
        else:
            _link_copies(kept_copies, out_dir, new)
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


def _named(files: Sequence[SourceFile]) -> list[SourceFile]:
    """Every label and file name through :mod:`transferlab.names` (NFC, safe for each sink);
    a file whose name is refused, or collides with another's after normalising, is rejected."""
    out: list[SourceFile] = []
    seen: set[tuple[str, str]] = set()
    label_name = functools.lru_cache(maxsize=None)(data_name)  # a few labels, many files
    for f in files:
        if f.problem is None:
            rel = f.rel.as_posix()
            try:
                key = (label_name(f.label), data_path_text(rel))
            except UnsafeName as exc:
                f = dataclasses.replace(f, problem=f"unsafe name: {exc}")
            else:
                if key != (f.label, rel):  # NFC changed it
                    f = dataclasses.replace(f, label=key[0], rel=PurePosixPath(key[1]))
                if key in seen:
                    f = dataclasses.replace(
                        f, problem=f"same name as another file: {key[0]}/{key[1]}"
                    )
                seen.add(key)
        out.append(f)
    return out


# ------------------------------------------------------------------ incremental pull


def _rules(params: DataParams) -> dict:
    """What a file's verdict depends on besides its bytes; the index holds only under these."""
    return {
        "version": _INDEX_VERSION,
        "min_size": params.min_size,
        "max_pixels": params.max_pixels,
        "max_bytes": params.max_bytes,
    }


def _index_key(f: SourceFile) -> str:
    return f"{f.label}/{f.rel}|{f.origin or f.path}"


def _read_index(out_dir: Path, rules: dict) -> dict[str, list]:
    """The previous pull's index, or {} when missing, damaged or made under other rules."""
    try:
        index = json.loads((out_dir / INDEX_NAME).read_text(encoding="utf-8"))
        if index.get("rules") == rules and isinstance(index.get("files"), dict):
            return index["files"]
    except (OSError, ValueError, AttributeError):
        pass
    return {}


def _write_index(
    path: Path, rules: dict, files: Sequence[SourceFile], results: Sequence[_Checked]
) -> None:
    entries = {
        _index_key(f): [r.size, r.mtime_ns, r.sha256, r.width, r.height, r.reason, r.copy_mtime_ns]
        for f, r in zip(files, results, strict=True)
        if r.size >= 0  # only what was read: "unreadable" and friends are tried again
    }
    text = json.dumps({"rules": rules, "files": entries}, separators=(",", ":"))
    path.write_text(text, encoding="utf-8")


def _known(entry: list) -> _Checked | None:
    """An index entry as a verdict, or None when it is not one (a damaged index)."""
    try:
        size, mtime_ns, sha, width, height, reason, copy_mtime_ns = entry
    except (TypeError, ValueError):
        return None
    ints = (size, mtime_ns, width, height, copy_mtime_ns)
    if not all(type(v) is int for v in ints) or not isinstance(sha, str):
        return None
    if reason is not None and not isinstance(reason, str):
        return None
    return _Checked(sha, width, height, reason, size, mtime_ns, copy_mtime_ns)


def _check_all(
    files: Sequence[SourceFile],
    params: DataParams,
    new: Path,
    out_dir: Path,
    index: dict[str, list],
    workers: int | None,
) -> tuple[list[_Checked], list[str]]:
    """The verdict on every file, in ``files`` order, and the unchanged copies to keep.

    Unchanged files (same size and mtime as in the index, copy under ``out_dir`` untouched) are
    not read: their copy under ``out_dir`` is kept (the paths relative to ``out_dir`` are
    returned). The rest go to :func:`_check` in worker processes, which copy accepted files
    under ``new``.
    """
    results: list[_Checked | None] = [None] * len(files)
    jobs: list[tuple[int, _Job]] = []
    kept: list[str] = []
    for i, f in enumerate(files):
        if f.problem is not None:
            results[i] = _Checked(reason=f.problem)
            continue
        rel = os.path.join(IMAGES_DIR, f.label, f.rel)  # plain strings: this loop runs per file
        entry = index.get(_index_key(f))
        known = _known(entry) if entry is not None else None
        if known is not None and (reused := _reuse(f.path, known, os.path.join(out_dir, rel))):
            results[i] = reused
            if reused.reason is None:
                kept.append(rel)
            continue
        job = _Job(
            src=str(f.path),
            dest=str(new / rel),
            min_size=params.min_size,
            max_pixels=params.max_pixels,
            max_bytes=params.max_bytes,
            background=tuple(params.background),
            known=known,
        )
        jobs.append((i, job))
    if reused := sum(r is not None and r.size >= 0 for r in results):
        log.info("%d file(s) unchanged since the last pull, not read again", reused)
    for (i, _), result in zip(jobs, _run_checks([j for _, j in jobs], workers), strict=True):
        results[i] = result
    return results, kept  # type: ignore[return-value]


def _reuse(src: Path, known: _Checked, old: str) -> _Checked | None:
    """``known`` again if ``src`` is unchanged (size, mtime) and its previous copy ``old`` is
    intact (same size, not modified since); else None."""
    try:
        st = os.stat(src)
        if (st.st_size, st.st_mtime_ns) != (known.size, known.mtime_ns):
            return None
        if known.reason is not None:
            return known  # rejected last time, unchanged since: rejected again
        ost = os.lstat(old)
        # The copy must be the very file this pull wrote: same size and mtime (an edited or
        # replaced copy is read again from the source).
        if not stat.S_ISREG(ost.st_mode) or (ost.st_size, ost.st_mtime_ns) != (
            known.size,
            known.copy_mtime_ns,
        ):
            return None
    except OSError:
        return None
    return known


def _replaces_a_copy(new: Path, out_dir: Path) -> bool:
    """Whether a file checked this time would overwrite a copy the current dataset holds (a
    changed source file): then the dataset is rebuilt beside the old one, not updated in it."""
    for dirpath, _, names in os.walk(new / IMAGES_DIR):
        rel = os.path.relpath(dirpath, new)
        if any(os.path.lexists(os.path.join(out_dir, rel, n)) for n in names):
            return True
    return False


def _link_copies(kept: Sequence[str], out_dir: Path, new: Path) -> None:
    """Hard-link the kept copies (paths under ``out_dir``) into the new dataset under ``new``."""
    made: set[str] = set()
    for rel in kept:
        dest = os.path.join(new, rel)
        parent = os.path.dirname(dest)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        try:
            os.link(os.path.join(out_dir, rel), dest)
        except OSError:  # file systems without hard links
            shutil.copy2(os.path.join(out_dir, rel), dest)


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
            # a kept copy is not under new/: the in-place update removes it with the unlisted
            (new / path).unlink(missing_ok=True)
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


def _update_in_place(new: Path, backup: Path, out_dir: Path, listed: set[str]) -> None:
    """Move the files checked this time into ``out_dir/images`` beside the kept copies, swap
    in the manifest, then remove the copies it no longer lists.

    Every moved file has a name the current dataset does not use (see _replaces_a_copy), so
    until the manifest is replaced the previous dataset stays whole; a failure removes what was
    moved in. A kill in between leaves only files the manifest does not list, which the next
    pull removes (and ``dataset_problem`` reports).
    """
    backup.mkdir()
    images = out_dir / IMAGES_DIR
    undo: list[tuple[Path, Path | None]] = []
    made: list[Path] = []
    try:
        for dirpath, _, names in os.walk(new / IMAGES_DIR):
            target_dir = out_dir / os.path.relpath(dirpath, new)
            if not target_dir.is_dir():
                target_dir.mkdir(parents=True)
                made.append(target_dir)
            for name in names:
                undo.append((target_dir / name, None))
                os.replace(os.path.join(dirpath, name), target_dir / name)
        _replace_files(new, backup, out_dir, undo)
    except BaseException:
        _restore(undo)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    for dirpath, _, names in os.walk(images, topdown=False):
        rel = os.path.relpath(dirpath, out_dir)
        for name in names:
            if os.path.join(rel, name).replace(os.sep, "/") not in listed:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(dirpath, name))
        if dirpath != str(images):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)  # only when empty


def _replace_files(
    new: Path, backup: Path, out_dir: Path, undo: list[tuple[Path, Path | None]]
) -> None:
    # The manifest goes after the images: it names the dataset, so it must not move ahead of
    # them. The index last: a stale one only costs a full check (see _reuse).
    for name in (REJECTED_NAME, MANIFEST_NAME, INDEX_NAME):
        target = out_dir / name
        if target.exists():
            _keep_copy(target, backup / name)
            undo.append((target, backup / name))
        else:
            undo.append((target, None))
        os.replace(new / name, target)


def _restore(undo: list[tuple[Path, Path | None]]) -> None:
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
        _replace_files(new, backup, out_dir, undo)
    except BaseException:
        _restore(undo)
        raise


# ------------------------------------------------------------------ temporary folders


def _make_tmp(out_dir: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=out_dir))
    owner = {"pid": os.getpid(), "host": socket.gethostname()}
    (tmp / _OWNER).write_text(json.dumps(owner), encoding="utf-8")
    return tmp


def remove_stale_tmp(out_dir: Path) -> list[Path]:
    """Remove the ``.pull-*`` folders that killed pulls left in ``out_dir``.

    A folder is stale when the process named in its owner file is gone (on this host), or when
    it has no owner file and is over an hour old. A live pull's folder is never touched, so this
    is safe even without the workspace lock (the stages hold it anyway). Links are not followed.

    Returns:
        The folders removed.
    """
    removed = []
    host = socket.gethostname()
    for tmp in Path(out_dir).glob(f"{_TMP_PREFIX}*"):
        if tmp.is_symlink() or not tmp.is_dir():
            continue
        stale = False
        try:
            owner = json.loads((tmp / _OWNER).read_text(encoding="utf-8"))
            stale = owner["host"] == host and not _alive(int(owner["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            with contextlib.suppress(OSError):
                stale = time.time() - tmp.stat().st_mtime > _UNOWNED_GRACE_S
        if stale:
            log.info("removing %s, left by an interrupted pull", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def dataset_problem(out_dir: Path) -> str | None:
    """Why the pulled dataset in ``out_dir`` is not whole (a file listed in the manifest is
    missing, or an unlisted one appeared under ``images/``), or None when it is.

    Cheap (names only, no reading), so a cached pull can be trusted only when this is None.
    """
    manifest = Path(out_dir) / MANIFEST_NAME
    try:
        listed = {row["path"] for row in read_manifest(manifest)}
    except (OSError, ValueError, KeyError) as exc:
        return f"{manifest} cannot be read: {exc}"
    images = Path(out_dir) / IMAGES_DIR
    present = {
        Path(dirpath, name).relative_to(out_dir).as_posix()
        for dirpath, _, names in os.walk(images)
        for name in names
    }
    if missing := sorted(listed - present):
        return f"{len(missing)} image(s) listed in {manifest} are missing, e.g. {missing[0]}"
    if extra := sorted(present - listed):
        return f"{len(extra)} file(s) under {images} are not in {manifest}, e.g. {extra[0]}"
    return None


def _keep_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # file systems without hard links
        shutil.copy2(src, dst)
