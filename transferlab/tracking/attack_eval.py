"""The attack-eval run: an on-demand attack of a registered model version."""

from __future__ import annotations

from pathlib import Path

from transferlab.config import Params
from transferlab.tracking.runs import invocation_run
from transferlab.tracking.store import experiment_id, git_state, scoped_tracking, tracking_uri


@scoped_tracking
def log_attack_eval(
    params: Params, workdir: Path, mv, *, metrics: dict[str, float], artifacts: list[Path]
) -> str:
    """One run recording an on-demand attack evaluation of a registered model version."""
    import mlflow

    uri = tracking_uri(params, workdir)
    exp_id = experiment_id(mlflow, params, workdir, uri)
    tags = {
        **git_state(workdir),
        "eval.model": mv.name,
        "eval.version": str(mv.version),
        "eval.source_run_id": mv.run_id or "",
        "params.hash": params.section_hash(),
    }
    with invocation_run(mlflow, exp_id, "attack-eval", tags) as (run, _):
        mlflow.log_params({k: v for k, v in params.flat().items() if k.startswith("attack.")})
        mlflow.log_metrics(metrics)
        for path in artifacts:
            mlflow.log_artifact(str(path))
    return run.info.run_id
