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


# What started a run, as the ``transferlab.run_kind`` tag. Only a ``deployment`` run (the
# scheduled Prefect deployment) or an explicit ``transferlab gate`` moves the champion alias.
DEPLOYMENT = "deployment"
DVC_EXPERIMENT = "dvc-experiment"
DVC_REPRO = "dvc-repro"
ADHOC = "adhoc"


def run_kind(context: dict[str, str] | None = None) -> dict[str, str]:
    """The ``transferlab.run_kind`` tag (and ``dvc.experiment`` for a ``dvc exp run``).

    DVC sets ``DVC_EXP_NAME`` for the stage commands of ``dvc exp run`` and ``DVC_STAGE`` for
    every stage it runs; a Prefect flow passes ``prefect.deployment_id`` in ``context`` when a
    deployment started it. Anything else (``transferlab run``, a single ``transferlab STAGE``)
    is ad hoc.
    """
    if os.environ.get("DVC_EXP_NAME"):
        return {
            "transferlab.run_kind": DVC_EXPERIMENT,
            "dvc.experiment": os.environ["DVC_EXP_NAME"],
        }
    if os.environ.get("DVC_STAGE"):
        return {"transferlab.run_kind": DVC_REPRO}
    if (context or {}).get("prefect.deployment_id"):
        return {"transferlab.run_kind": DEPLOYMENT}
    return {"transferlab.run_kind": ADHOC}


def may_move_champion(context: dict[str, str] | None) -> bool:
    """Whether a gate run may move the champion alias.

    ``context`` is the flow's lineage context, or None when a person typed ``transferlab gate``
    (under DVC that command is a pipeline stage, not a decision, so it never promotes).
    """
    if context is None:
        return not os.environ.get("DVC_STAGE")
    return run_kind(context)["transferlab.run_kind"] == DEPLOYMENT
