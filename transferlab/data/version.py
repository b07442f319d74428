"""The data version: DVC's hash of the pulled images, as recorded in ``dvc.lock`` or recomputed.

DVC 3 hashes a folder as the md5 of the JSON list ``[{"md5": <file md5>, "relpath": ...}, ...]``
(sorted by relpath, keys sorted), with ``.dir`` appended. Computing it the same way means a run
outside ``dvc repro`` (the Prefect flow, a notebook) records the same version DVC would.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import yaml

DATA_OUT = "data/images"


def dvc_dir_hash(folder: Path) -> str:
    """DVC 3's md5 of a folder (``<hex>.dir``), computed from the files under it."""
    entries = []
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = Path(dirpath, name)
            h = hashlib.md5()
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            rel = path.relative_to(folder).as_posix()
            entries.append({"md5": h.hexdigest(), "relpath": rel})
    entries.sort(key=lambda e: e["relpath"])
    blob = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(blob).hexdigest() + ".dir"


def lock_hash(root: Path, out: str = DATA_OUT) -> str | None:
    """The md5 that ``dvc.lock`` records for the pull stage's ``out``, if any."""
    try:
        lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    for entry in (lock.get("stages", {}).get("pull", {}) or {}).get("outs", []) or []:
        if entry.get("path") == out:
            return entry.get("md5")
    return None


def data_version_tags(root: Path) -> dict[str, str]:
    """MLflow tags naming the exact pulled bytes.

    ``data.dvc_hash`` is the DVC hash of ``data/images``: from ``dvc.lock`` when it matches the
    folder on disk (so ``dvc pull`` of that hash gives back these images), else recomputed;
    ``data.dvc_hash_source`` says which (``dvc.lock`` or ``computed``).
    """
    folder = root / DATA_OUT
    if not folder.is_dir():
        return {}
    computed = dvc_dir_hash(folder)
    locked = lock_hash(root)
    if locked == computed:
        return {"data.dvc_hash": locked, "data.dvc_hash_source": "dvc.lock"}
    # No lock (a Prefect run) or a stale one (the folder changed since dvc repro).
    return {"data.dvc_hash": computed, "data.dvc_hash_source": "computed"}
