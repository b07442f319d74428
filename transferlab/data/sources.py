"""List the candidate image files of a data source, one class label per file.

Listing only looks at names; whether a file really is a usable image is decided later, by
:func:`transferlab.data.images.open_rgb`, so that every rejection gets a reason in the report.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from transferlab.config import (
    FashionMnistSource,
    FolderSource,
    HttpSource,
    IdxSource,
    ManifestSource,
    S3Source,
    TorchvisionSource,
    TuxpaintSource,
)
from transferlab.data.files import IMAGE_EXTENSIONS, DataSourceError, is_junk
from transferlab.names import UnsafeName, data_name, data_path

__all__ = ["IMAGE_EXTENSIONS", "DataSourceError", "SourceFile", "list_source"]

log = logging.getLogger(__name__)

TUXPAINT_EXTENSIONS = frozenset({".png", ".jpg"})
# Tux Paint ships flipped copies of some stamps; they would be near-duplicates across splits.
TUXPAINT_SKIP_NAME_PARTS = ("_mirror", "_flip")
# Drawings, not photos, in a preset whose point is photos.
TUXPAINT_SKIP_FOLDERS = frozenset({"cartoon"})

TUXPAINT_HINT = (
    "install Debian's tuxpaint-stamps-default "
    "(apt-get install --no-install-recommends tuxpaint-stamps-default) "
    "or point data.source at a folder: {kind: folder, path: ...}"
)


class SourceFile(NamedTuple):
    """One candidate image.

    Plain strings, not path objects: a pull handles one of these for every file of the source,
    and for an unchanged file building path objects cost more than the rest of its work.
    ``path`` and ``rel`` give the path objects when wanted.

    Attributes:
        file: absolute path of the file.
        label: its class.
        relpath: its ``/``-separated path inside the class, used as
            ``images/<label>/<relpath>`` in the dataset.
        origin: where it came from when that is not ``file`` (an S3 or HTTP URI, an IDX record).
        problem: why the file is refused without being read (a symlink out of the source, a
            name no sink accepts); it then appears in ``rejected.json`` with this reason.
    """

    file: str
    label: str
    relpath: str
    origin: str = ""
    problem: str | None = None

    @property
    def path(self) -> Path:
        """``file`` as a path."""
        return Path(self.file)

    @property
    def rel(self) -> PurePosixPath:
        """``relpath`` as a path."""
        return PurePosixPath(self.relpath)

    @property
    def uri(self) -> str:
        """URI of the original, as recorded in the manifest: ``origin`` or ``file://`` path."""
        return self.origin or Path(self.file).as_uri()


def _source_file(path: Path, label: str, rel: PurePosixPath, **kw) -> SourceFile:
    """A :class:`SourceFile` from path objects (the listers of fetched or converted files)."""
    return SourceFile(str(path), label, rel.as_posix(), **kw)


_BY_NAME = operator.attrgetter("label", "relpath")  # the order of every listing


def list_source(source, scratch: Path | None = None) -> tuple[list[SourceFile], list[str]]:
    """List the candidate images of ``source``, fetching or converting them first if needed.

    Folders, presets on disk and manifests are listed in place. HTTP archives, S3 prefixes and
    torchvision datasets are downloaded into their cache (``source.path``) first; IDX files and
    torchvision datasets are written as PNG files into ``scratch``.

    Args:
        source: the ``data.source`` section.
        scratch: an empty folder for converted images (needed by idx, fashion_mnist,
            torchvision); the caller removes it after the images are copied.

    Returns:
        ``(files, classes)``: files sorted by ``(label, rel)``; every class the source defines,
        sorted, including those without a single candidate file.

    Raises:
        DataSourceError: the source folder does not exist.
    """
    if isinstance(source, TuxpaintSource):
        return _list_tuxpaint(source)
    if isinstance(source, FolderSource):
        return _list_folder(source)
    if isinstance(source, ManifestSource):
        return _list_manifest(source)
    if isinstance(source, HttpSource):
        return _list_http(source)
    if isinstance(source, S3Source):
        return _list_s3(source)
    if isinstance(source, IdxSource | FashionMnistSource | TorchvisionSource):
        if scratch is None:
            raise ValueError(f"a {source.kind} source needs a scratch folder for its PNG files")
        if isinstance(source, TorchvisionSource):
            return _list_torchvision(source, scratch)
        return _list_idx(source, scratch)
    raise DataSourceError(f"unknown data source kind {getattr(source, 'kind', source)!r}")


def _walk_images(
    top: Path, extensions: frozenset[str], skip_dirs: frozenset[str] = frozenset()
) -> list[Path]:
    """Image files under ``top``, recursively, hidden and junk entries left out, sorted."""
    return [Path(p) for p, _ in _walk_entries(top, extensions, skip_dirs)]


def _walk_entries(
    top: Path, extensions: frozenset[str], skip_dirs: frozenset[str] = frozenset()
) -> list[tuple[str, bool]]:
    """``(path, is_symlink)`` of the image files under ``top``, sorted by path.

    Linked folders are not entered (a link can lead anywhere); whether a file is a link comes
    from the directory listing itself, so it costs no system call per file. Paths are plain
    strings (sorting path objects costs more than the walk).
    """
    found: list[tuple[str, bool]] = []
    stack = [str(top)]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue  # unreadable folder: like os.walk, nothing to list
        for e in entries:
            name = e.name
            if is_junk(name):
                continue
            if e.is_dir(follow_symlinks=False):
                if name.lower() not in skip_dirs:
                    stack.append(e.path)
            # the extension (os.path.splitext costs more than the rest of this loop)
            elif name[name.rfind(".") :].lower() in extensions:
                found.append((e.path, e.is_symlink()))
    found.sort()
    return found


def _list_folder(
    source: FolderSource, root: Path | None = None, origin: str = ""
) -> tuple[list[SourceFile], list[str]]:
    root = root or source.path.expanduser().resolve()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataSourceError(
            f"data.source.path {root} {what}; point it at a folder with one subfolder per class "
            f"(<path>/<class>/<image>)"
        )
    files: list[SourceFile] = []
    classes: list[str] = []
    loose = 0
    for entry in sorted(root.iterdir()):
        if is_junk(entry.name):
            continue
        if not entry.is_dir():
            loose += 1
            continue
        label = entry.name
        with contextlib.suppress(UnsafeName):
            label = data_name(entry.name)  # NFC; a bad name is refused per file by the pull
        classes.append(label)
        outside = _outside(entry, root)
        if outside:
            # Not walked at all: a class folder linked elsewhere would import that folder.
            files.append(SourceFile(str(entry), label, entry.name, origin, outside))
            continue
        cut = len(str(entry)) + 1
        for name, is_link in _walk_entries(entry, IMAGE_EXTENSIONS):
            rel = name[cut:]
            where = f"{origin}#{entry.name}/{rel}" if origin else ""
            problem = _outside(Path(name), root) if is_link else None
            files.append(SourceFile(name, label, rel, where, problem))
    files.sort(key=_BY_NAME)
    if loose:
        log.info(
            "ignored %d file(s) at the top of %s: images must sit in a class folder", loose, root
        )
    return files, classes


def _outside(path: Path, root: Path, *, deep: bool = False) -> str | None:
    """Why ``path`` leads out of ``root`` through a symlink, or None: links are followed only
    inside the source. ``deep`` also checks the folders on the way (needed for manifest paths;
    a folder walk never enters a linked folder)."""
    if not deep and not path.is_symlink():
        return None
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):  # missing: the pull reports it as unreadable
        return "broken symlink" if path.is_symlink() else None
    if target.is_relative_to(root):
        return None
    return f"symlink out of the source folder: to {target}"


def _list_tuxpaint(source: TuxpaintSource) -> tuple[list[SourceFile], list[str]]:
    root = source.path.expanduser().resolve()
    if not root.is_dir():
        raise DataSourceError(
            f"Tux Paint stamps not found at {root} (data.source.path): {TUXPAINT_HINT}"
        )
    files: list[SourceFile] = []
    for label in sorted(source.classes):
        for sub in source.classes[label]:
            top = root / sub
            if not top.is_dir():
                raise DataSourceError(
                    f"Tux Paint class {label!r}: folder {top} not found; fix data.source.classes "
                    f"or {TUXPAINT_HINT}"
                )
            for path in _walk_images(top, TUXPAINT_EXTENSIONS, TUXPAINT_SKIP_FOLDERS):
                if any(part in path.stem for part in TUXPAINT_SKIP_NAME_PARTS):
                    continue
                # Relative to the stamps root, so two subfolders of one class cannot collide.
                rel = path.relative_to(root).as_posix()
                files.append(SourceFile(str(path), label, rel))
    files.sort(key=_BY_NAME)
    return files, sorted(source.classes)


def _list_manifest(source: ManifestSource) -> tuple[list[SourceFile], list[str]]:
    import csv
    import json

    manifest = source.path.expanduser().resolve()
    if not manifest.is_file():
        raise DataSourceError(
            f"manifest {manifest} (data.source.path) not found; point it at a CSV with a "
            f'path,label header or a JSON list of {{"path": ..., "label": ...}}'
        )
    base = manifest.parent
    text = manifest.read_text(encoding="utf-8-sig")
    try:
        if manifest.suffix.lower() == ".json":
            entries = json.loads(text)
            if not isinstance(entries, list):
                raise ValueError("expected a JSON list")
        else:
            reader = csv.DictReader(text.splitlines())
            if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
                raise ValueError(f"header is {reader.fieldnames}, needs path and label")
            entries = list(reader)
        pairs = [(str(e["path"]).strip(), str(e["label"]).strip()) for e in entries]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataSourceError(f"manifest {manifest}: cannot read it: {exc}") from None
    files: list[SourceFile] = []
    seen: set[tuple[str, str]] = set()
    labels: set[str] = set()
    for i, (rel_path, raw_label) in enumerate(pairs, start=1):
        what = "label"
        try:
            label = data_name(raw_label)
            what = "path"
            p = data_path(rel_path.replace("\\", "/"))
        except UnsafeName as exc:
            raise DataSourceError(
                f"manifest {manifest}, entry {i}: {what} {exc}; paths must be relative to the "
                f"manifest's folder and stay inside it, labels non-empty plain names"
            ) from None
        labels.add(label)
        if (label, p.as_posix()) in seen:
            continue
        seen.add((label, p.as_posix()))
        path = base / p
        files.append(_source_file(path, label, p, problem=_outside(path, base, deep=True)))
    files.sort(key=_BY_NAME)
    return files, sorted(labels)


def _list_idx(
    source: IdxSource | FashionMnistSource, scratch: Path
) -> tuple[list[SourceFile], list[str]]:
    from transferlab.config import FASHION_MNIST_CLASSES
    from transferlab.data import idx

    folder = source.path.expanduser().resolve()
    names_given = (
        FASHION_MNIST_CLASSES if isinstance(source, FashionMnistSource) else source.classes
    )
    if isinstance(source, FashionMnistSource) and not folder.is_dir():
        return _fashion_mnist_download(source, scratch)
    if not folder.is_dir():
        raise DataSourceError(f"IDX folder {folder} (data.source.path) does not exist")
    files: list[SourceFile] = []
    counts: dict[str, int] = {}
    classes: set[str] = set()
    for split in source.splits:
        try:
            images_path = idx.find_idx(folder, split, "images")
            labels_path = idx.find_idx(folder, split, "labels")
            images, labels = idx.read_idx(images_path), idx.read_idx(labels_path)
        except (FileNotFoundError, idx.IdxError) as exc:
            raise DataSourceError(f"IDX source: {exc}; check data.source.path/splits") from None
        if images.ndim != 3 or len(images) != len(labels):
            raise DataSourceError(
                f"{images_path}: {images.shape} images for {len(labels)} labels in {labels_path}"
            )
        names = idx.class_names(int(labels.max()) + 1, names_given)
        classes.update(names)
        for path, label, rel in idx.write_pngs(
            images,
            labels,
            names,
            scratch,
            prefix=split,
            per_class=source.per_class,
            counts=counts,
        ):
            index = int(rel.stem.rsplit("-", 1)[1])
            origin = f"{images_path.as_uri()}#{index}"
            files.append(_source_file(path, label, rel, origin=origin))
    files.sort(key=_BY_NAME)
    return files, sorted(classes)


def _fashion_mnist_download(
    source: FashionMnistSource, scratch: Path
) -> tuple[list[SourceFile], list[str]]:
    log.warning(
        "Fashion-MNIST not found at %s (Debian's dataset-fashion-mnist); using torchvision's "
        "downloader into %s",
        source.path,
        source.cache,
    )
    files: list[SourceFile] = []
    classes: set[str] = set()
    for split in source.splits:
        tv = TorchvisionSource(
            name="FashionMNIST",
            path=source.cache,
            split="train" if split == "train" else "test",
            per_class=source.per_class,
        )
        got, names = _list_torchvision(tv, scratch, prefix=split)
        files += got
        classes.update(names)
    files.sort(key=_BY_NAME)
    return files, sorted(classes)


def _list_torchvision(
    source: TorchvisionSource, scratch: Path, prefix: str | None = None
) -> tuple[list[SourceFile], list[str]]:
    from transferlab.data.tvsets import load_torchvision, write_dataset_pngs

    cache = source.path.expanduser().resolve()
    ds = load_torchvision(source.name, cache, split=source.split, download=source.download)
    written = write_dataset_pngs(
        ds, scratch, prefix=prefix or source.split, per_class=source.per_class
    )
    files = [
        _source_file(
            path,
            label,
            rel,
            origin=f"torchvision://{source.name}/{source.split}#{rel.stem.rsplit('-', 1)[1]}",
        )
        for path, label, rel in written
    ]
    files.sort(key=_BY_NAME)
    return files, sorted({f.label for f in files})


def _list_http(source: HttpSource) -> tuple[list[SourceFile], list[str]]:
    from transferlab.data import http

    cache = source.path.expanduser().resolve()
    archive = http.download(
        source.url, source.sha256, cache, retries=source.retries, timeout=source.timeout
    )
    tree = http.extract(archive, cache / source.sha256.lower())
    root = http.archive_root(tree, source.root)
    return _list_folder(FolderSource(path=root), root, origin=source.url)


def _list_s3(source: S3Source) -> tuple[list[SourceFile], list[str]]:
    from transferlab.data.s3 import parse_url, sync_prefix

    result = sync_prefix(source)
    bucket, _ = parse_url(source.url)
    files = [
        _source_file(result.root / o.label / o.rel, o.label, o.rel, origin=f"s3://{bucket}/{o.key}")
        for o in result.objects
    ]
    files += [
        _source_file(
            result.root, "", PurePosixPath(), origin=f"s3://{bucket}/{key}", problem=reason
        )
        for key, reason in result.refused
    ]
    files.sort(key=_BY_NAME)
    return files, result.classes
