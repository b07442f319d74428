"""Names that come from data, checked once for every place they end up.

Class labels (folder names, manifest and S3 labels, dataset class lists) and file names inside a
class (folder walks, S3 keys, archive members) travel far: they become folders and files under
``data/images`` (the file system, DVC's hashes), CSV cells, MLflow metric keys and params, and
HTML. Every such name is built here, by :func:`data_name` (one path segment) or
:func:`data_path` (a relative path of segments), so each sink's rule is written once:

- file system and DVC: one segment, never ``.``/``..``, no ``/``, ``\\`` or NUL, no control or
  undecodable characters (a non-UTF-8 file name arrives as lone surrogates), at most 255 bytes;
  a path is relative and has no empty segment (an S3 key ``prefix//abs/path`` would otherwise
  become the absolute path ``/abs/path``);
- Unicode: NFC, so ``é`` typed on macOS (NFD) and on Linux (NFC) is one label;
- MLflow: :func:`metric_key` maps any label onto the characters MLflow accepts, keeping two
  labels apart by a short digest when characters had to be replaced;
- HTML: the report escapes every cell (``html_report._esc``); names never need to be HTML-safe.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import PurePosixPath

# One file-name component on the common file systems (ext4, APFS, NTFS via UTF-16 is more).
MAX_SEGMENT_BYTES = 255
# Bidirectional overrides reorder how a name is displayed ("gpj.exe" shown as "exe.jpg").
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Unicode categories that never belong in a name: control, surrogate (undecodable bytes),
# private use, unassigned.
_BAD_CATEGORIES = frozenset({"Cc", "Cs", "Co", "Cn"})
# MLflow's rule for metric and param keys (mlflow.utils.validation), minus ':' (not on Windows).
_METRIC_UNSAFE = re.compile(r"[^\w.\- /]")
_MAX_METRIC_KEY = 250


class UnsafeName(ValueError):
    """A name from data that some sink would not accept.

    Attributes:
        reason: short cause, e.g. ``"'..' would leave its folder"``.
    """

    def __init__(self, name: object, reason: str) -> None:
        super().__init__(f"{_show(name)}: {reason}")
        self.name = name
        self.reason = reason


def _show(name: object) -> str:
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "...'"


def data_name(raw: str) -> str:
    """One path segment from data (a class label, a file name), NFC-normalised and checked.

    Args:
        raw: the name as found (folder name, manifest cell, part of an S3 key).

    Returns:
        The NFC form of ``raw``, safe as a file or folder name, a CSV cell and (through
        :func:`metric_key`) an MLflow key.

    Raises:
        UnsafeName: empty, ``.`` or ``..``, a separator, a control or undecodable character,
            leading or trailing blanks, or longer than 255 bytes.
    """
    if not isinstance(raw, str):
        raise UnsafeName(raw, f"expected text, got {type(raw).__name__}")
    name = unicodedata.normalize("NFC", raw)
    if not name.strip():
        raise UnsafeName(raw, "empty name")
    if name in (".", ".."):
        raise UnsafeName(raw, f"{name!r} would leave its folder")
    if "/" in name or "\\" in name:
        raise UnsafeName(raw, "a name must not contain '/' or '\\'")
    # printable ASCII (most names) has no character of the kinds below: skip the scan
    for ch in () if name.isascii() and name.isprintable() else name:
        if unicodedata.category(ch) in _BAD_CATEGORIES or ch in _BIDI_CONTROLS:
            what = "undecodable byte" if unicodedata.category(ch) == "Cs" else "control character"
            raise UnsafeName(raw, f"{what} U+{ord(ch):04X} in the name")
    if name != name.strip():
        raise UnsafeName(raw, "leading or trailing blanks")
    if len(name.encode("utf-8")) > MAX_SEGMENT_BYTES:
        raise UnsafeName(raw, f"longer than {MAX_SEGMENT_BYTES} bytes")
    return name


def data_path(raw: str) -> PurePosixPath:
    """A relative path from data (inside a class folder, an S3 key below the prefix).

    Args:
        raw: ``/``-separated path.

    Returns:
        The path with every segment checked by :func:`data_name`.

    Raises:
        UnsafeName: absolute, an empty segment (``a//b``, a trailing ``/``), or a bad segment.
    """
    return PurePosixPath(data_path_text(raw))


def data_path_text(raw: str) -> str:
    """:func:`data_path` as ``/``-separated text (the same checks, no path object)."""
    if not isinstance(raw, str) or not raw:
        raise UnsafeName(raw, "empty path")
    if raw.startswith("/"):
        raise UnsafeName(raw, "absolute path; must be relative to its folder")
    parts = raw.split("/")
    if "" in parts:
        raise UnsafeName(raw, "empty path segment ('//' or a trailing '/')")
    try:
        return "/".join([data_name(p) for p in parts])
    except UnsafeName as exc:
        raise UnsafeName(raw, f"segment {_show(exc.name)}: {exc.reason}") from None


def metric_key(name: str) -> str:
    """``name`` as a valid MLflow metric or param key, distinct for distinct names.

    Letters and digits of any script, ``_ - . /`` and spaces are kept; any other character
    (emoji, apostrophes, ``&``, brackets) becomes ``_``, and a 6-digit digest of the original
    is then appended so that ``"cat's"`` and ``"cat&s"`` stay two keys.
    """
    safe = _METRIC_UNSAFE.sub("_", name)
    if safe == name and len(safe) <= _MAX_METRIC_KEY and ".." not in safe:
        return safe
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:6]
    return f"{safe.replace('..', '__')[: _MAX_METRIC_KEY - 7]}-{digest}"
