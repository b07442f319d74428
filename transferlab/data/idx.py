"""Read IDX files (the MNIST family's format) and write their images as PNG files.

The format (http://yann.lecun.com/exdb/mnist/): a big-endian header ``0, 0, dtype, ndim``, then
``ndim`` uint32 sizes, then the data in C order. Images are ``(N, H, W)`` uint8, labels ``(N,)``.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from transferlab.progress import progress

log = logging.getLogger(__name__)

_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# 16 GB: all of ImageNet at 64 px would fit; a header claiming more is a broken or hostile file
MAX_IDX_BYTES = 16 << 30


class IdxError(ValueError):
    """A file that is not valid IDX; the message names the file and what is wrong."""


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file, gzip-compressed (``.gz``) or raw.

    Args:
        path: the file.

    Returns:
        The array, shape and dtype from the header (``(N, H, W)`` uint8 for images, ``(N,)``
        uint8 for labels).

    Raises:
        IdxError: bad magic number, unknown type, or a size that does not match the header.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            # The header first: the data is then read up to the size it declares (bounded), so
            # a gzip bomb or a huge file cannot make this allocate more than it says.
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _DTYPES:
                raise IdxError(f"{path}: not an IDX file (bad magic number {head.hex()})")
            dtype, ndim = _DTYPES[head[2]], head[3]
            dims = f.read(4 * ndim)
            if len(dims) != 4 * ndim:
                raise IdxError(f"{path}: header cut short")
            shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
            expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if expected > MAX_IDX_BYTES:
                raise IdxError(
                    f"{path}: header says {shape} ({expected} bytes), over the {MAX_IDX_BYTES} "
                    "bytes an IDX source may hold"
                )
            body = f.read(expected + 1)
    except (OSError, EOFError) as exc:
        raise IdxError(f"{path}: cannot read: {exc}") from None
    if len(body) != expected:
        got = f"{len(body)}" if len(body) <= expected else "more"
        raise IdxError(f"{path}: header says {shape} ({expected} bytes), file has {got}")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def find_idx(folder: Path, split: str, what: str) -> Path:
    """``<split>-<what>-idx?-ubyte`` in ``folder``, ``.gz`` or raw (``what``: images|labels).

    Also accepts the ``<split>-<what>.idx?-ubyte`` spelling some mirrors use.
    """
    for pattern in (f"{split}-{what}-idx*-ubyte*", f"{split}-{what}.idx*-ubyte*"):
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    raise FileNotFoundError(f"no {split}-{what}-idx?-ubyte[.gz] in {folder}")


def class_names(n_labels: int, classes: Sequence[str]) -> list[str]:
    """Names for labels ``0..n_labels-1``: ``classes`` when given, else the digits."""
    if not classes:
        return [str(i) for i in range(n_labels)]
    if len(classes) < n_labels:
        raise IdxError(f"{len(classes)} class names given for labels 0..{n_labels - 1}")
    # A slash would become a folder level inside the class.
    return [c.replace("/", "_") for c in classes]


def write_pngs(
    images: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    out: Path,
    *,
    prefix: str,
    per_class: int | None,
    counts: dict[str, int],
) -> list[tuple[Path, str, PurePosixPath]]:
    """Write ``images`` as ``out/<class>/<prefix>-<index>.png``.

    Args:
        images: ``(N, H, W)`` or ``(N, H, W, 3)`` uint8 in 0..255.
        labels: ``(N,)`` integer labels indexing ``names``.
        names: class names.
        out: folder to write into.
        prefix: start of each file name (the split), so two splits cannot collide.
        per_class: stop a class at this many images (counted across calls through ``counts``).
        counts: images written so far per class; updated.

    Returns:
        ``(path, label, rel)`` per written file, in index order.
    """
    written: list[tuple[Path, str, PurePosixPath]] = []
    width = len(str(len(images)))
    for i in progress(range(len(images)), desc=f"writing {prefix} PNGs", unit="img"):
        label = names[int(labels[i])]
        if per_class is not None and counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        rel = PurePosixPath(f"{prefix}-{i:0{width}d}.png")
        dest = out / label / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        # compress_level 1: these are intermediate files, re-read once by the checks.
        Image.fromarray(np.ascontiguousarray(images[i])).save(dest, compress_level=1)
        written.append((dest, label, rel))
    return written
