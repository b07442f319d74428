"""The pull's index: what each source file gave last time, so that an unchanged file is not read
again (``data/pull-index.tsv``).

A header line, then one line per file that was read, fields separated by tabs (``|`` here)::

    transferlab pull index | version | rules as JSON | naming rules
    key | size | mtime_ns | copy_mtime_ns | width | height | sha256 | uri | reason

The key says where the file goes in the dataset and where it comes from (see
:func:`index_key`). Lines of text rather than JSON, because an incremental pull handles every
file of the source: the index is cut into lines once, an unchanged file's line is written back
as it was read, and only the lines of files that are looked up get split. A field holding a tab
or a line break cannot be stored; such a file is left out and simply checked again next time.

The index only ever saves work. A missing or damaged index, a line that does not parse, or a
header made under other rules (image limits, this format, the naming rules of
:mod:`transferlab.names`) means a full check, never a different dataset.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from transferlab import names

INDEX_NAME = "pull-index.tsv"
# Earlier versions' index (JSON), removed by the next pull so it does not linger in data/.
LEGACY_INDEX_NAMES = ("pull-index.json",)
_VERSION = 3
_MAGIC = "transferlab pull index"
_FIELDS = 9
# surrogatepass: a file name that is not UTF-8 reaches Python as lone surrogates; it must round
# trip, not fail the pull.
_ENCODING = ("utf-8", "surrogatepass")


class Verdict(NamedTuple):
    """The outcome of checking one source file; ``reason`` set means rejected."""

    sha256: str = ""
    width: int = 0
    height: int = 0
    reason: str | None = None
    size: int = -1  # the source file's size and mtime when it was read (-1: not read)
    mtime_ns: int = -1
    copy_mtime_ns: int = -1  # mtime of the copy under images/ (accepted files)
    uri: str = ""  # the manifest's source column (SourceFile.uri)


@functools.cache
def _naming_rules() -> str:
    """A digest of :mod:`transferlab.names`: a name found in the index passed those rules, so
    the pull skips checking it again (see ``pull._named``) only while they are the same."""
    return hashlib.sha256(Path(names.__file__).read_bytes()).hexdigest()[:16]


def index_header(rules: Mapping[str, object]) -> str:
    """The header line for verdicts made under ``rules`` (the image limits)."""
    return "\t".join((_MAGIC, str(_VERSION), json.dumps(rules, sort_keys=True), _naming_rules()))


def index_key(label: str, relpath: str, source: str) -> str:
    """A file's key: ``<label>/<relpath>`` in the dataset, ``|``, its origin or path."""
    return f"{label}/{relpath}|{source}"


def read_index(path: Path, header: str) -> dict[str, str]:
    """The lines of the index at ``path`` by key, or {} when it is missing, unreadable or was
    written under another header."""
    try:
        text = path.read_bytes().decode(*_ENCODING)
    except (OSError, UnicodeDecodeError):
        return {}
    lines = text.split("\n")
    if lines[0] != header:
        return {}
    return {line.partition("\t")[0]: line for line in lines[1:]}


def parse_line(line: str | None) -> Verdict | None:
    """An index line as a verdict, or None (no line, or a damaged one)."""
    if line is None:
        return None
    fields = line.split("\t")
    if len(fields) != _FIELDS:
        return None
    _, size, mtime_ns, copy_mtime_ns, width, height, sha256, uri, reason = fields
    try:
        return Verdict(
            sha256,
            int(width),
            int(height),
            reason or None,
            int(size),
            int(mtime_ns),
            int(copy_mtime_ns),
            uri,
        )
    except ValueError:
        return None


def index_line(key: str, v: Verdict) -> str | None:
    """``v`` as the index line for ``key``, or None when a field cannot be stored."""
    line = (
        f"{key}\t{v.size}\t{v.mtime_ns}\t{v.copy_mtime_ns}\t{v.width}\t{v.height}\t{v.sha256}"
        f"\t{v.uri}\t{v.reason or ''}"
    )
    if line.count("\t") != _FIELDS - 1 or "\n" in line:
        return None
    return line


def write_index(path: Path, header: str, lines: Sequence[str]) -> None:
    """Write the index: ``header``, then ``lines`` (from :func:`index_line` or
    :func:`read_index`)."""
    path.write_bytes("\n".join([header, *lines]).encode(*_ENCODING))
