"""The ``pull`` stage's work: check every image of a source and freeze the usable ones.

Output layout under ``out_dir``::

    images/<class>/<path inside the class>   original bytes of each accepted file
    manifest.csv                              path,label,sha256,width,height,source
    rejected.json                             [{"source": uri, "reason": text}, ...]
    pull-index.tsv                            what each source file gave last time (below)

They are replaced together at the end, so a failed run leaves the previous dataset whole.

The pull is incremental. ``pull-index.tsv`` (:mod:`~transferlab.data.pull_index`) records, per
source file, its size, mtime and sha256 and the outcome (accepted with its size in pixels, or
the reason for rejecting it), plus the mtime of the copy under ``images/``. A file whose size and
mtime are unchanged, and whose copy is untouched, is not read: its copy stays. A file read again
(a source converted afresh each run, like IDX) whose sha256 is unchanged is not decoded again.
Anything else is checked in full. When the checks only add files, their copies go straight into
``images/`` under names the current manifest does not list, then the manifest is swapped, then
the files it no longer lists go; a changed file makes the pull build the dataset beside the old
one and swap it in. The index only ever saves work: a missing, stale or damaged index means a
full check, never a different dataset.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import gc
import hashlib
import io
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
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from transferlab.config import DataParams, FolderSource
from transferlab.data.images import ImageRejected, decode_rgb
from transferlab.data.manifest import LABELLED, MANIFEST_COLUMNS, read_manifest
from transferlab.data.pull_index import (
    INDEX_NAME,
    LEGACY_INDEX_NAMES,
    Verdict,
    index_header,
    index_key,
    index_line,
    parse_line,
    read_index,
    write_index,
)
from transferlab.data.sources import IMAGE_EXTENSIONS, DataSourceError, SourceFile, list_source
from transferlab.names import UnsafeName, data_name, data_path_text
from transferlab.progress import progress

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
REJECTED_NAME = "rejected.json"
IMAGES_DIR = "images"
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
class _Job:
    src: str
    dest: str
    min_size: int
    max_pixels: int
    max_bytes: int
    background: tuple[int, int, int]
    # what the index says these bytes gave last time: if the sha256 still matches, no decode
    known: Verdict | None = None


def _check(job: _Job) -> Verdict:
    """Validate one file and, if usable, copy its bytes to ``job.dest`` (runs in a worker).

    Reading the bytes once for hash, decode and copy means the recorded hash is always that of
    the copied bytes, even if the original changes meanwhile. The size is judged from the file's
    metadata before it is read, so a huge (or sparse, or endless) file costs nothing.
    """
    try:
        # stat follows links: those left in the listing stay inside the source (sources.py)
        st = os.stat(job.src)
        if not stat.S_ISREG(st.st_mode):
            return Verdict(reason="not a regular file (a device, FIFO or socket)")
        if st.st_size > job.max_bytes:
            return Verdict(reason=f"too large: {st.st_size} bytes > data.max_bytes {job.max_bytes}")
        with open(job.src, "rb") as f:
            data = f.read(job.max_bytes + 1)
    except OSError as exc:
        return Verdict(reason=f"unreadable: {exc.strerror or exc}")
    except MemoryError:
        return Verdict(reason="unreadable: out of memory while reading")
    if len(data) > job.max_bytes:  # it grew after the stat
        return Verdict(reason=f"too large: over data.max_bytes {job.max_bytes} bytes")
    sha = hashlib.sha256(data).hexdigest()
    read = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
    known = job.known
    if known is not None and known.sha256 == sha:
        checked = known._replace(**read)  # same bytes: same verdict, no decode
    else:
        checked = Verdict(**read, **_judge(data, job))
    if checked.reason is None:
        try:
            _write(job.dest, data)
        except FileNotFoundError:  # the first file of its folder: one mkdir, not one per file
            os.makedirs(os.path.dirname(job.dest), exist_ok=True)
            _write(job.dest, data)
        checked = checked._replace(copy_mtime_ns=os.stat(job.dest).st_mtime_ns)
    return checked


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


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


def _run_checks(jobs: Sequence[_Job], workers: int | None) -> Iterator[Verdict]:
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
            files += [f._replace(relpath=f"{LABELLED}/{f.relpath}") for f in extra]
            classes = sorted(set(classes) | set(extra_classes))
        listed = True
        if not files:
            exts = " ".join(sorted(IMAGE_EXTENSIONS))
            found = ", ".join(classes) or "none"
            raise DataSourceError(
                f"no images found under {root} (class folders: {found}); expected "
                f"<class>/<image> files ending in one of: {exts}"
            )
        header = index_header(_rules(params))
        index = read_index(out_dir / INDEX_NAME, header)
        files, keys = _named(files, index)
        new = tmp / "new"
        new.mkdir()
        # Every worker has finished when this returns, so none still writes if a later step
        # fails and what it wrote is removed.
        plan = _check_all(files, keys, params, new, out_dir, index, workers)
        try:
            rows, rejected, rejected_per_class, dropped = _collect(files, plan.results)
            kept = Counter(row[0] for row in rows)
            _summarise(classes, kept, rejected, rejected_per_class)
            empty, small = _check_class_sizes(classes, kept, min_per_class)
            if len(kept) < 2:
                raise DataSourceError(_too_few_classes(root, classes, files, kept, rejected))
            _write_manifest(new / MANIFEST_NAME, rows)
            (new / REJECTED_NAME).write_text(
                json.dumps(rejected, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )
            write_index(new / INDEX_NAME, header, plan.index_lines)
            listed_paths = {row[1] for row in rows}
            if plan.in_place:
                _swap_files(new, tmp / "previous", out_dir)
            else:
                for path in dropped:  # duplicates: copied by the checks, not in the manifest
                    (new / path).unlink(missing_ok=True)
                # a kept copy that became a duplicate of a new file is left out too
                (new / IMAGES_DIR).mkdir(exist_ok=True)
                _link_copies([p for p in plan.kept if p in listed_paths], out_dir, new)
                _swap_in(new, tmp / "previous", out_dir)
        except BaseException:
            plan.discard(out_dir)
            raise
        if plan.in_place:
            # The new manifest is in place: the copies it no longer lists go (dropped files,
            # duplicates, what a killed pull left). Leftovers only cost a later pull a rebuild.
            _remove_unlisted(out_dir, listed_paths)
        for name in LEGACY_INDEX_NAMES:
            with contextlib.suppress(OSError):
                (out_dir / name).unlink(missing_ok=True)
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


def _named(
    files: Sequence[SourceFile], index: Mapping[str, str]
) -> tuple[list[SourceFile], list[str]]:
    """Every label and file name through :mod:`transferlab.names` (NFC, safe for each sink);
    a file whose name is refused, or collides with another's after normalising, is rejected.

    Returns:
        The files, and each one's key in the index. A file whose key is in ``index`` was named
        by the pull that wrote it, under the same naming rules (the index header says which):
        its names are not checked again.
    """
    out: list[SourceFile] = []
    keys: list[str] = []
    seen: set[str] = set()
    label_name = functools.lru_cache(maxsize=None)(data_name)  # a few labels, many files
    for f in files:
        key = ""
        if f.problem is None:
            key = index_key(f.label, f.relpath, f.origin or f.file)
            if key not in index:
                try:
                    label, relpath = label_name(f.label), data_path_text(f.relpath)
                except UnsafeName as exc:
                    f = f._replace(problem=f"unsafe name: {exc}")
                else:
                    if (label, relpath) != (f.label, f.relpath):  # NFC changed it
                        f = f._replace(label=label, relpath=relpath)
                        key = index_key(label, relpath, f.origin or f.file)
        if f.problem is None:
            # label and relpath are checked names: no '/' in the label, so this is unambiguous
            rel = f"{f.label}/{f.relpath}"
            if rel in seen:
                f = f._replace(problem=f"same name as another file: {rel}")
            seen.add(rel)
        out.append(f)
        keys.append(key)
    return out, keys


# ------------------------------------------------------------------ incremental pull


def _rules(params: DataParams) -> dict:
    """What a file's verdict depends on besides its bytes; the index holds only under these."""
    return {
        "min_size": params.min_size,
        "max_pixels": params.max_pixels,
        "max_bytes": params.max_bytes,
    }


@dataclass(frozen=True)
class _Plan:
    """What :func:`_check_all` found and did.

    Attributes:
        results: the verdict on every file, in the listing's order.
        index_lines: the new index's lines (see :mod:`~transferlab.data.pull_index`).
        kept: manifest paths (``images/<label>/<relpath>``) of the unchanged copies kept.
        in_place: the checked files were copied straight into ``out_dir/images``, under names
            the current dataset does not use; else under ``new/images`` for a new dataset.
        written: in place, the manifest paths the checks may have written.
    """

    results: list[Verdict]
    index_lines: list[str]
    kept: list[str]
    in_place: bool
    written: list[str]

    def discard(self, out_dir: Path) -> None:
        """Remove what the checks copied into ``out_dir`` (the pull failed before the swap)."""
        if not self.in_place:
            return  # under new/, removed with the pull's temporary folder
        folders = set()
        for path in self.written:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out_dir, path))
            folders.add(os.path.dirname(path))
        for folder in sorted(folders, reverse=True):  # a new class's folder, now empty
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(out_dir, folder))


def _check_all(
    files: Sequence[SourceFile],
    keys: Sequence[str],
    params: DataParams,
    new: Path,
    out_dir: Path,
    index: Mapping[str, str],
    workers: int | None,
) -> _Plan:
    """Judge every file; copy the accepted ones that are not unchanged.

    Unchanged files (same size and mtime as in the index, copy under ``out_dir`` untouched) are
    not read: their copy under ``out_dir`` is kept, and their index line is the verdict. The
    rest go to :func:`_check` in worker processes, which copy accepted files. When there are
    kept copies and none of the rest would overwrite a copy (new files only, not changed
    ones), the copies go straight into ``out_dir/images``: the current dataset stays whole, as
    its manifest does not list them yet (see :class:`_Plan`). Else they go under
    ``new/images``, for a dataset built beside the current one.

    Plain strings throughout: the first loop runs for every file of the source.
    """
    results: list[Verdict | None] = [None] * len(files)
    lines: list[str] = []
    todo: list[tuple[int, str, Verdict | None]] = []  # (index in files, path in images/, known)
    kept: list[str] = []
    old_images = os.path.join(out_dir, IMAGES_DIR)
    for i, f in enumerate(files):
        if f.problem is not None:
            results[i] = Verdict(reason=f.problem, uri=f.uri)
            continue
        rel = f"{f.label}/{f.relpath}"
        line = index.get(keys[i])
        known = parse_line(line)
        if known is not None and _unchanged(f.file, known, f"{old_images}/{rel}"):
            results[i] = known
            lines.append(line)  # type: ignore[arg-type]
            if known.reason is None:
                kept.append(f"{IMAGES_DIR}/{rel}")
        else:
            todo.append((i, rel, known))
    if lines:
        log.info("%d file(s) unchanged since the last pull, not read again", len(lines))
    in_place = bool(kept) and not any(os.path.lexists(f"{old_images}/{t[1]}") for t in todo)
    images = old_images if in_place else os.path.join(new, IMAGES_DIR)
    written = [f"{IMAGES_DIR}/{rel}" for _, rel, _ in todo] if in_place else []
    rules = (params.min_size, params.max_pixels, params.max_bytes, tuple(params.background))
    jobs = [_Job(files[i].file, f"{images}/{rel}", *rules, known=k) for i, rel, k in todo]
    plan = _Plan(results, lines, kept, in_place, written)  # type: ignore[arg-type]
    try:
        for (i, _, _), result in zip(todo, _run_checks(jobs, workers), strict=True):
            results[i] = result = result._replace(uri=files[i].uri)
            # only what was read: "unreadable" and friends are tried again
            if result.size >= 0 and (line := index_line(keys[i], result)) is not None:
                lines.append(line)
    except BaseException:
        plan.discard(out_dir)
        raise
    return plan


def _unchanged(src: str, known: Verdict, old: str) -> bool:
    """Whether ``src`` is unchanged since ``known`` (size, mtime) and its previous copy ``old``
    is intact (same size, not modified since): then ``known`` holds without reading it."""
    try:
        st = os.stat(src)
        if st.st_size != known.size or st.st_mtime_ns != known.mtime_ns:
            return False
        if known.reason is not None:
            return True  # rejected last time, unchanged since: rejected again
        ost = os.lstat(old)
    except OSError:
        return False
    # The copy must be the very file this pull wrote: same size and mtime (an edited or
    # replaced copy is read again from the source).
    return (
        stat.S_ISREG(ost.st_mode)
        and ost.st_size == known.size
        and ost.st_mtime_ns == known.copy_mtime_ns
    )


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


_MANIFEST_HEADER = ",".join(MANIFEST_COLUMNS) + "\n"


def _manifest_line(path: str, label: str, res: Verdict) -> str:
    """One manifest row as CSV text, the columns of MANIFEST_COLUMNS; what ``csv`` writes."""
    line = f"{path},{label},{res.sha256},{res.width},{res.height},{res.uri}\n"
    # Most rows need no quoting: then the fields joined by commas are the CSV (checked once,
    # on the whole line, instead of per field by the csv module).
    if line.count(",") == 5 and line.count("\n") == 1 and '"' not in line and "\r" not in line:
        return line
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(
        (path, label, res.sha256, res.width, res.height, res.uri)
    )
    return buf.getvalue()


def _write_manifest(path: Path, rows: Sequence[tuple[str, str, str]]) -> None:
    """The manifest from :func:`_collect`'s rows (it lies in the pull's temporary folder until
    the swap, so a plain write is enough)."""
    path.write_text(
        _MANIFEST_HEADER + "".join(row[2] for row in rows), encoding="utf-8", newline=""
    )


def _collect(
    files: Sequence[SourceFile], results: Sequence[Verdict]
) -> tuple[list[tuple[str, str, str]], list[dict[str, str]], Counter[str], list[str]]:
    """Manifest rows, rejections (in ``files`` order), rejections per class, and the paths of
    accepted files dropped as duplicates of an earlier one.

    A row is ``(label, path, CSV line)``; rows come sorted by label, then path.
    """
    rows: list[tuple[str, str, str]] = []
    rejected: list[dict[str, str]] = []
    rejected_labels: list[str] = []
    first_seen: dict[str, str] = {}  # sha256 -> path
    dropped: list[str] = []
    for f, res in zip(files, results, strict=True):
        reason = res.reason
        if reason is None:
            path = f"{IMAGES_DIR}/{f.label}/{f.relpath}"
            first = first_seen.setdefault(res.sha256, path)
            if first == path:  # the first file with these bytes (paths are unique)
                rows.append((f.label, path, _manifest_line(path, f.label, res)))
                continue
            reason = f"duplicate: same bytes as {first}"
            dropped.append(path)
        rejected.append({"source": res.uri, "reason": reason})
        rejected_labels.append(f.label)
    rows.sort()
    return rows, rejected, Counter(rejected_labels), dropped


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def _summarise(
    classes: Sequence[str],
    kept: Counter[str],
    rejected: Sequence[dict[str, str]],
    rejected_per_class: Counter[str],
) -> None:
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


def _swap_files(new: Path, backup: Path, out_dir: Path) -> None:
    """Replace the manifest, rejections and index in ``out_dir`` with those under ``new``, all
    or none: a failure restores the previous ones."""
    backup.mkdir()
    undo: list[tuple[Path, Path | None]] = []
    try:
        _replace_files(new, backup, out_dir, undo)
    except BaseException:
        _restore(undo)
        raise


def _remove_unlisted(out_dir: Path, listed: set[str]) -> None:
    """Remove the files under ``out_dir/images`` whose path (relative to ``out_dir``) is not in
    ``listed``, and the folders left empty.

    Names and set differences, not a stat per file: the folders hold the whole dataset.
    """
    folders = [IMAGES_DIR]
    todo = [IMAGES_DIR]
    while todo:
        folder = todo.pop()
        try:
            names = os.listdir(os.path.join(out_dir, folder))
        except OSError:
            continue
        for path in {f"{folder}/{name}" for name in names} - listed:
            full = os.path.join(out_dir, path)
            if os.path.isdir(full) and not os.path.islink(full):
                folders.append(path)
                todo.append(path)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(full)
    for folder in sorted(folders[1:], reverse=True):  # deepest first
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(out_dir, folder))  # only when empty


def _replace_files(
    new: Path, backup: Path, out_dir: Path, undo: list[tuple[Path, Path | None]]
) -> None:
    # The manifest goes after the images: it names the dataset, so it must not move ahead of
    # them. The index last: a stale one only costs a full check (see _unchanged).
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
