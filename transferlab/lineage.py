"""Which DVC pipeline state a run came from, as MLflow tags (no MLflow import here).

DVC sets ``DVC_ROOT`` and ``DVC_STAGE`` in the environment of the stage commands it runs; outside
DVC (the Prefect flow) the same tags are computed from the workspace.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def dvc_state(workdir: Path) -> dict[str, str]:
    """DVC lineage tags: ``dvc.lock_hash`` and ``dvc.stage`` when known.

    The data version (``data.dvc_hash``) comes from ``transferlab.data.version``.

    Args:
        workdir: the pipeline workspace (the DVC root when DVC runs the stage).
    """
    tags: dict[str, str] = {}
    root = Path(os.environ.get("DVC_ROOT") or workdir)
    if os.environ.get("DVC_STAGE"):
        tags["dvc.stage"] = os.environ["DVC_STAGE"]
    lock_path = root / "dvc.lock"
    if lock_path.is_file():
        tags["dvc.lock_hash"] = hashlib.sha256(lock_path.read_bytes()).hexdigest()
    return tags
