"""The dataset manifest: one CSV row per image, whose bytes are the dataset's identity."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from transferlab.atomic import atomic_write

MANIFEST_COLUMNS = ("path", "label", "sha256", "width", "height", "source")
_INT_COLUMNS = ("width", "height")
# Images merged in by `transferlab label import` sit at images/<class>/labelled/... in a dataset.
LABELLED = "labelled"


def is_labelled(path: str) -> bool:
    """Whether a manifest ``path`` (``images/<class>/...``) came from ``label import``."""
    parts = path.split("/")
    return len(parts) > 3 and parts[2] == LABELLED


_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (large files need not fit in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_hash(path: Path) -> str:
    """SHA-256 of the manifest file's bytes: the identity of a dataset version."""
    return file_sha256(path)


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Read a manifest (or any CSV with a header) into dicts.

    Args:
        path: the CSV file.

    Returns:
        Rows in file order; ``width`` and ``height`` as ``int`` when present.
    """
    with open(path, encoding="utf-8", newline="") as fh:
        rows: list[dict[str, Any]] = list(csv.DictReader(fh))
    for row in rows:
        for key in _INT_COLUMNS:
            if key in row:
                row[key] = int(row[key])
    return rows


def write_csv_atomic(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Write a CSV so that readers see either the old file or the whole new one.

    Fixed ``\\n`` line endings and UTF-8 keep the bytes identical across platforms and reruns.
    """
    with atomic_write(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row[c] for c in columns})
