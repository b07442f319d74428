"""The content-addressed feature cache on disk: shards, verify, gc, info.

Layout of a cache folder (``features.cache_dir``; point several workspaces, or a team, at one
folder on a shared or network disk)::

    <root>/<space>/space.json                  what the key space digests (backbone, dtype...)
    <root>/<space>/shard-<sha256 of file>.npz  ``sha256`` (N,) str + ``features`` (N, D) float32
    <root>/last_run.json                       hit/miss counts of the last extraction

A key space digests everything besides the image that determines a feature vector (backbone
name, weights digest, preprocessing, background, layer, dtype); inside it, a row is found by the
image's sha256. Shards are immutable and named by the sha256 of their own bytes, so ``verify``
can check each one without an index, and two writers never clash: each writes its own temp file
(fsynced) and renames it into place. A reader that finds two shards holding one image takes
either (they hold the same features). A kill mid-write leaves only a ``.shard-*.tmp`` file, which
readers ignore and ``verify --repair`` removes.

Safe to share between processes and machines as long as the file system's rename is atomic
(local disks, NFSv3+, SMB). ``gc`` rewrites shards, so run it when no extraction is filling
the same cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from transferlab.atomic import atomic_write, write_json
from transferlab.data.manifest import file_sha256

log = logging.getLogger(__name__)

SHARD_RE = re.compile(r"^shard-([0-9a-f]{64})\.npz$")
LAST_RUN = "last_run.json"
SPACE_INFO = "space.json"
QUARANTINE = ".quarantine"
# per key space: shard name -> [size, mtime_ns, inode] when last verified (see read_shard)
VERIFIED = ".verified.json"
# a temp file older than this is left over from a killed writer, not one still writing
STALE_TMP_SECONDS = 3600.0


def _fsync_dir(folder: Path) -> None:
    # the rename itself must reach the disk too, or a crash can lose a finished shard
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(dest: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``dest``, fsync it, rename it into place.

    The file gets the permissions a plain ``open()`` would (umask), so teammates sharing the
    cache folder can read it.
    """
    with atomic_write(dest) as f:
        f.write(data)
    _fsync_dir(dest.parent)


def atomic_write_json(dest: Path, obj: object) -> None:
    """``transferlab.atomic.write_json``, then the folder synced like ``atomic_write_bytes``."""
    write_json(dest, obj)
    _fsync_dir(dest.parent)


def write_shard(folder: Path, shas: Sequence[str], features: np.ndarray) -> Path:
    """Write one immutable shard named by the sha256 of its bytes.

    Args:
        shas: image sha256 hex digests, one per row.
        features: (N, D) features; stored as float32.

    Returns:
        The shard's path (an existing identical shard is reused).
    """
    buf = io.BytesIO()
    np.savez(buf, sha256=np.asarray(list(shas), dtype=str), features=features.astype(np.float32))
    data = buf.getvalue()
    shard = folder / f"shard-{hashlib.sha256(data).hexdigest()}.npz"
    try:
        # an existing shard is reused only if it really holds these bytes (a truncated or
        # zeroed file under this name would otherwise be served forever)
        intact = shard.stat().st_size == len(data) and shard.read_bytes() == data
    except OSError:
        intact = False
    if not intact:
        atomic_write_bytes(shard, data)
    return shard


def read_shard_shas(shard: Path) -> list[str]:
    with np.load(shard, allow_pickle=False) as z:
        return z["sha256"].tolist()


class CorruptShard(ValueError):
    """A shard whose bytes do not match its name, or that does not parse."""


# a file modified this recently may be rewritten again within the same mtime tick, unseen by
# the stat check (git's "racily clean" problem): such files are hashed, not recorded
RACY_NS = 2_000_000_000


def _stat_key(shard: Path) -> list[int] | None:
    st = shard.stat()
    if time.time_ns() - st.st_mtime_ns < RACY_NS:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def read_shard(shard: Path, verified: dict[str, list[int]] | None = None):
    """A shard's ids and features, after checking its bytes against the digest in its name.

    The sha256 pass runs once per shard file: ``verified`` (name -> size, mtime, inode of the
    file when it was last verified or written) lets a later read skip it while the file is
    unchanged. Any rewrite (truncation, zeros, a flipped byte) changes those and is hashed
    again. A verified file is recorded in ``verified``.

    Returns:
        (ids, (N, D) float32 features).

    Raises:
        CorruptShard: digest mismatch (truncated, rewritten), unreadable, or inconsistent.
        FileNotFoundError: another process removed it meanwhile.
    """
    match = SHARD_RE.match(shard.name)
    if match is None:
        raise CorruptShard(f"{shard}: not named shard-<sha256>.npz")
    key = _stat_key(shard)
    unchanged = verified is not None and key is not None and verified.get(shard.name) == key
    if not unchanged and file_sha256(shard) != match.group(1):
        raise CorruptShard(f"{shard}: its bytes do not match the digest in its name")
    try:
        with np.load(shard, allow_pickle=False) as z:
            shas, feats = z["sha256"].tolist(), z["features"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise CorruptShard(f"{shard}: unreadable ({exc})") from None
    if feats.ndim != 2 or len(shas) != len(feats):
        raise CorruptShard(f"{shard}: {len(shas)} ids for features of shape {feats.shape}")
    if verified is not None and key is not None:
        verified[shard.name] = key
    return shas, feats


def quarantine(shard: Path) -> Path | None:
    """Move a bad shard to ``<space>/.quarantine/`` (kept for a post-mortem, never read
    again); its images are simply extracted again."""
    dest = shard.parent / QUARANTINE / f"{shard.name}.{int(time.time())}"
    dest.parent.mkdir(exist_ok=True)
    try:
        os.replace(shard, dest)
    except FileNotFoundError:
        return None  # another reader moved it first
    log.warning(
        "corrupt cache shard %s moved to %s; its images will be extracted again", shard, dest
    )
    return dest


def shards(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("shard-*.npz") if SHARD_RE.match(p.name))


def spaces(root: Path) -> list[Path]:
    """Key-space folders under a cache root."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


class EntriesLost(RuntimeError):
    """Shards that failed verification while being served (see :meth:`FeatureCache.get`)."""

    def __init__(self, shards: list[Path]):
        super().__init__(f"{len(shards)} cache shard(s) failed verification: {shards[:3]}")
        self.shards = shards


@dataclass
class FeatureCache:
    """Features by image sha256 inside one key space of a cache folder."""

    root: Path
    space: str
    hits: int = 0
    misses: int = 0
    _index: dict[str, tuple[Path, int]] = field(default_factory=dict, repr=False)
    _verified: dict[str, list[int]] = field(default_factory=dict, repr=False)
    _saved: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @property
    def folder(self) -> Path:
        return self.root / self.space

    def describe(self, meta: dict) -> None:
        """Record what this key space digests (for ``cache info``), once."""
        dest = self.folder / SPACE_INFO
        if not dest.exists():
            atomic_write_json(dest, meta)

    def refresh(self) -> None:
        """Rebuild the in-memory index from the shards on disk; quarantine unreadable ones."""
        self._index.clear()
        try:
            self._verified = json.loads((self.folder / VERIFIED).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self._verified = {}
        if not isinstance(self._verified, dict):
            self._verified = {}
        self._saved = dict(self._verified)
        for shard in shards(self.folder):
            try:
                shas = read_shard_shas(shard)
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
                quarantine(shard)
                continue
            for row, sha in enumerate(shas):
                self._index.setdefault(sha, (shard, row))

    def _save_verified(self) -> None:
        # a record lost to a concurrent writer only costs one more hash pass later
        present = {p.name for p in shards(self.folder)}
        self._verified = {k: v for k, v in self._verified.items() if k in present}
        if self._verified == self._saved:
            return
        self._saved = dict(self._verified)
        try:
            atomic_write_json(self.folder / VERIFIED, self._verified)
        except OSError as exc:  # a read-only shared cache still serves, hashing every time
            log.debug("cannot record verified shards in %s: %s", self.folder, exc)

    def __contains__(self, sha: str) -> bool:
        return sha in self._index

    def __len__(self) -> int:
        return len(self._index)

    def get(self, shas: Sequence[str]) -> np.ndarray:
        """Stack cached features for ``shas`` (all must be present), in order.

        Returns:
            (len(shas), D) float32.

        Raises:
            EntriesLost: some shards failed their digest check (now quarantined) or vanished;
                their images are no longer in the index, so extract them and ask again.
        """
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for i, sha in enumerate(shas):
            shard, row = self._index[sha]
            by_shard.setdefault(shard, []).append((i, row))
        out: np.ndarray | None = None
        lost: list[Path] = []
        for shard, pairs in by_shard.items():
            try:
                ids, feats = read_shard(shard, self._verified)
            except FileNotFoundError:
                lost.append(shard)
                continue
            except CorruptShard:
                quarantine(shard)
                lost.append(shard)
                continue
            if any(r >= len(ids) or ids[r] != shas[i] for i, r in pairs):
                lost.append(shard)  # replaced under the same name since the index was built
                continue
            if out is None:
                out = np.empty((len(shas), feats.shape[1]), dtype=np.float32)
            idx, rows = zip(*pairs, strict=True)
            out[list(idx)] = feats[list(rows)]
        self._save_verified()
        if lost:
            gone = set(lost)
            self._index = {k: v for k, v in self._index.items() if v[0] not in gone}
            raise EntriesLost(lost)
        return out if out is not None else np.empty((0, 0), dtype=np.float32)

    def put(self, shas: Sequence[str], features: np.ndarray) -> Path:
        """Append one shard (idempotent: its name is the digest of its bytes)."""
        shard = write_shard(self.folder, shas, features)
        for row, sha in enumerate(shas):
            self._index.setdefault(sha, (shard, row))
        return shard


# ------------------------------------------------------------------ last-run stats


def record_run(root: Path, stats: dict, *, name: str = "features") -> None:
    """Persist the last run's counts in the cache folder (for ``cache info``), under ``name``.

    ``features`` is the last extraction through the stage; ``shards`` the last sharded run of
    the flow (summed over shards), since the stage that follows it only assembles from the cache.
    Two processes recording at once can lose one record (stats only; the shards are safe).
    """
    runs = last_run(root) or {}
    runs[name] = {**stats, "finished_at": time.time()}
    atomic_write_json(Path(root) / LAST_RUN, runs)


def last_run(root: Path) -> dict | None:
    try:
        return json.loads((Path(root) / LAST_RUN).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ verify


@dataclass
class VerifyReport:
    checked: int = 0
    corrupt: list[str] = field(default_factory=list)
    stale_tmp: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.corrupt

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _shard_problem(shard: Path) -> str | None:
    """Why a shard is corrupt, or None."""
    match = SHARD_RE.match(shard.name)
    if match is None:
        return "name is not shard-<sha256>.npz"
    if file_sha256(shard) != match.group(1):
        return "digest mismatch"
    try:
        with np.load(shard) as z:
            shas, feats = z["sha256"], z["features"]
        if feats.ndim != 2 or len(shas) != len(feats):
            return f"shape mismatch: {shas.shape} ids, {feats.shape} features"
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        return f"unreadable: {exc}"
    return None


def verify(root: Path, *, repair: bool = False) -> VerifyReport:
    """Check every shard's digest (and that it loads); with ``repair``, delete corrupt shards.

    A deleted shard's images are simply extracted again on the next run. Temp files left by a
    killed writer (older than an hour) are reported, and removed with ``repair``.
    """
    report = VerifyReport()
    now = time.time()
    for space in spaces(Path(root)):
        for shard in space.glob("shard-*.npz"):
            report.checked += 1
            problem = _shard_problem(shard)
            if problem:
                log.error("corrupt shard %s: %s", shard, problem)
                report.corrupt.append(f"{shard}: {problem}")
                if repair:
                    shard.unlink(missing_ok=True)
                    report.removed.append(str(shard))
        for tmp in space.glob(".shard-*.tmp"):
            try:
                stale = now - tmp.stat().st_mtime > STALE_TMP_SECONDS
            except FileNotFoundError:
                continue  # its writer just renamed it into place
            if stale:
                report.stale_tmp.append(str(tmp))
                if repair:
                    tmp.unlink(missing_ok=True)
                    report.removed.append(str(tmp))
    return report


# ------------------------------------------------------------------ gc


@dataclass
class GcReport:
    shards_removed: int = 0
    shards_rewritten: int = 0
    entries_kept: int = 0
    entries_dropped: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def gc(root: Path, keep: Iterable[str], *, dry_run: bool = False) -> GcReport:
    """Drop cache entries whose image sha256 is not in ``keep`` (in every key space).

    A shard with no kept rows is deleted; one with some is rewritten with only those (new shard
    first, then the old one removed, so a kill in between loses nothing).
    """
    keep = set(keep)
    report = GcReport(bytes_before=_size(root))
    for space in spaces(Path(root)):
        for shard in shards(space):
            try:
                with np.load(shard) as z:
                    shas, feats = z["sha256"].tolist(), z["features"]
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
                log.warning("gc: skipping unreadable shard %s (see `cache verify`)", shard)
                continue
            rows = [i for i, s in enumerate(shas) if s in keep]
            report.entries_kept += len(rows)
            report.entries_dropped += len(shas) - len(rows)
            if len(rows) == len(shas) or dry_run:
                continue
            if rows:
                write_shard(space, [shas[i] for i in rows], feats[rows])
                report.shards_rewritten += 1
            else:
                report.shards_removed += 1
            shard.unlink(missing_ok=True)
    report.bytes_after = report.bytes_before if dry_run else _size(root)
    return report


# ------------------------------------------------------------------ info


def info(root: Path) -> dict:
    """Size, shards and entries per key space, and the last run's hit rate."""
    root = Path(root)
    out: dict = {"root": str(root.resolve()), "bytes": 0, "shards": 0, "spaces": {}}
    for space in spaces(root):
        ids: set[str] = set()
        size = 0
        found = shards(space)
        for shard in found:
            size += shard.stat().st_size
            try:
                ids.update(read_shard_shas(shard))
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
                log.warning("info: unreadable shard %s (see `cache verify`)", shard)
        try:
            meta = json.loads((space / SPACE_INFO).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        out["spaces"][space.name] = {
            "entries": len(ids),
            "shards": len(found),
            "bytes": size,
            **{k: meta[k] for k in ("backbone", "dtype", "layer") if k in meta},
        }
        out["bytes"] += size
        out["shards"] += len(found)
    out["last_run"] = last_run(root)
    return out
