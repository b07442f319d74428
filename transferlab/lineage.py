"""Where a run's data and pipeline state came from, as MLflow tags (no MLflow import here).

DVC sets ``DVC_ROOT`` and ``DVC_STAGE`` in the environment of the stage commands it runs; outside
DVC (the Prefect flow) the same tags are computed from the workspace.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def dvc_dir_hash(path: Path) -> str | None:
    """DVC's own md5 of a folder (``<md5>.dir``, what ``dvc.lock`` records), or None if absent.

    Computed with ``dvc_data`` so it matches ``dvc.lock`` byte for byte, whether or not DVC ran.
    """
    if not path.is_dir():
        return None
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory(prefix="transferlab-dvc-") as tmp:
        # build() stores the .dir listing in an object db; a throwaway one keeps it out of .dvc/
        _, _, obj = build(HashFileDB(fs, tmp), str(path), fs, "md5")
    return obj.hash_info.value


def dvc_state(workdir: Path, data_dir: str = "data/images") -> dict[str, str]:
    """DVC lineage tags: ``data.dvc_hash``, and ``dvc.lock_hash`` / ``dvc.stage`` when known.

    Args:
        workdir: the pipeline workspace (the DVC root when DVC runs the stage).
        data_dir: the data folder whose DVC hash identifies the data version.
    """
    tags: dict[str, str] = {}
    root = Path(os.environ.get("DVC_ROOT") or workdir)
    if os.environ.get("DVC_STAGE"):
        tags["dvc.stage"] = os.environ["DVC_STAGE"]
    lock_path = root / "dvc.lock"
    if lock_path.is_file():
        tags["dvc.lock_hash"] = hashlib.sha256(lock_path.read_bytes()).hexdigest()
    # Hashed from the folder, not read from dvc.lock, which may predate this run's pull.
    data_hash = dvc_dir_hash(workdir / data_dir)
    if data_hash is not None:
        tags["data.dvc_hash"] = data_hash
    return tags
