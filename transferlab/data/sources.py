"""List the candidate image files of a data source, one class label per file.

Listing only looks at names; whether a file really is a usable image is decided later, by
:func:`transferlab.data.images.open_rgb`, so that every rejection gets a reason in the report.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from transferlab.config import FolderSource, TuxpaintSource

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
TUXPAINT_EXTENSIONS = frozenset({".png", ".jpg"})
# Tux Paint ships flipped copies of some stamps; they would be near-duplicates across splits.
TUXPAINT_SKIP_NAME_PARTS = ("_mirror", "_flip")
# Drawings, not photos, in a preset whose point is photos.
TUXPAINT_SKIP_FOLDERS = frozenset({"cartoon"})
# Litter that operating systems and archivers leave in folders.
_JUNK_NAMES = frozenset({"__macosx", "thumbs.db", "desktop.ini", ".ds_store"})

TUXPAINT_HINT = (
    "install Debian's tuxpaint-stamps-default "
    "(apt-get install --no-install-recommends tuxpaint-stamps-default) "
    "or point data.source at a folder: {kind: folder, path: ...}"
)


class DataSourceError(RuntimeError):
    """The data source cannot give a usable dataset; the message is one line saying what to do."""


@dataclass(frozen=True)
class SourceFile:
    """One candidate image.

    Attributes:
        path: absolute path of the file.
        label: its class.
        rel: its path inside the class, used as ``images/<label>/<rel>`` in the dataset.
    """

    path: Path
    label: str
    rel: PurePosixPath

    @property
    def uri(self) -> str:
        """``file://`` URI of the original, as recorded in the manifest."""
        return self.path.as_uri()


def list_source(source: FolderSource | TuxpaintSource) -> tuple[list[SourceFile], list[str]]:
    """List the candidate images of ``source``.

    Args:
        source: the ``data.source`` section.

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
    raise DataSourceError(f"unknown data source kind {getattr(source, 'kind', source)!r}")


def _is_junk(name: str) -> bool:
    return name.startswith(".") or name.lower() in _JUNK_NAMES


def _walk_images(
    top: Path, extensions: frozenset[str], skip_dirs: frozenset[str] = frozenset()
) -> list[Path]:
    """Image files under ``top``, recursively, hidden and junk entries left out, sorted."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(top):
        # Pruning in place stops os.walk descending into hidden folders and __MACOSX.
        dirnames[:] = [d for d in dirnames if not _is_junk(d) and d.lower() not in skip_dirs]
        for name in filenames:
            if _is_junk(name):
                continue
            if os.path.splitext(name)[1].lower() in extensions:
                found.append(Path(dirpath, name))
    return sorted(found)


def _list_folder(source: FolderSource) -> tuple[list[SourceFile], list[str]]:
    root = source.path.expanduser().resolve()
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
        if _is_junk(entry.name):
            continue
        if not entry.is_dir():
            loose += 1
            continue
        classes.append(entry.name)
        for path in _walk_images(entry, IMAGE_EXTENSIONS):
            rel = PurePosixPath(path.relative_to(entry).as_posix())
            files.append(SourceFile(path=path, label=entry.name, rel=rel))
    files.sort(key=lambda f: (f.label, f.rel.as_posix()))
    if loose:
        log.info(
            "ignored %d file(s) at the top of %s: images must sit in a class folder", loose, root
        )
    return files, classes


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
                rel = PurePosixPath(path.relative_to(root).as_posix())
                files.append(SourceFile(path=path, label=label, rel=rel))
    files.sort(key=lambda f: (f.label, f.rel.as_posix()))
    return files, sorted(source.classes)
