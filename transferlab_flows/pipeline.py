"""The end-to-end pipeline as a Prefect flow: the same stage functions ``dvc repro`` runs.

Run it with ``transferlab run`` or ``python -m transferlab_flows.pipeline``; without
PREFECT_API_URL, Prefect starts a temporary local server (ephemeral mode), so nothing needs to be
running.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from prefect import flow
from prefect.runtime import deployment, flow_run

from transferlab.config import load_params
from transferlab.redact import install_log_redaction
from transferlab.stages import STAGES
from transferlab.tracking import check_tracking_store
from transferlab.workspace import workspace_lock
from transferlab_flows.ephemeral import prefect_api
from transferlab_flows.features import run_feature_shards
from transferlab_flows.tasks.attack import map_attack_batches
from transferlab_flows.tasks.stages import (
    CONTEXT_STAGES,
    DEFAULT_TIMEOUT,
    RETRIES,
    TIMEOUTS,
    outputs_present,
    run_stage,
    stage_cached,
    stage_tags,
)

log = logging.getLogger(__name__)


def lineage_context() -> dict[str, str]:
    """The Prefect flow run this is, for the MLflow tags, and the deployment that started it.

    The UI link is only there when a Prefect UI serves the run (``PREFECT_UI_URL``, derived from
    ``PREFECT_API_URL``): an ephemeral run has none, and ``flow_run.ui_url`` would then read
    ``None/flow-runs/...``.
    """
    from prefect.utilities.urls import url_for

    ctx = {"prefect.flow_run_id": str(flow_run.id)}
    url = url_for("flow-run", obj_id=str(flow_run.id))
    if url and url.startswith(("http://", "https://")):
        ctx["prefect.flow_run_url"] = url
    if deployment.id:
        ctx["prefect.deployment_id"] = str(deployment.id)
    return ctx


def mark_abandoned_runs(workdir: str) -> list[str]:
    """Mark CRASHED the pipeline runs still RUNNING in this workspace: this run holds the
    workspace lock, so their processes are gone (a ``kill -9``, a lost machine) and no one
    else will ever finish them. Returns their ids."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    me = str(flow_run.id)
    marked = []
    with get_client(sync_client=True) as client:
        running = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[pipeline.name])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
            ),
        )
        for run in running:
            there = run.parameters.get("workdir")
            if str(run.id) == me or there is None or Path(there).resolve() != Path(workdir):
                continue
            client.set_flow_run_state(
                run.id,
                Crashed(message="its process died; marked by the next run in this workspace"),
                force=True,
            )
            marked.append(str(run.id))
    if marked:
        log.warning("marked abandoned pipeline run(s) CRASHED: %s", marked)
    return marked


# Work a stage's task only reads back: the feature cache filled shard by shard on the configured
# runner (the stage then assembles features.npz from it), and the attack's (model, batch) shards.
PRE_STEPS = {"features": run_feature_shards, "attack": map_attack_batches}


@flow(name="transferlab-pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml", workdir: str = ".") -> dict:
    """Pull, split, features, svm, attack, report; returns each stage's summary."""
    # Task logs and tracebacks go to Prefect's database: mask credentials in URLs first (one
    # can come from the environment, e.g. MLFLOW_TRACKING_URI)
    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect.extra"):
        install_log_redaction(logging.getLogger(name))
    # parsed once: every task gets this frozen value; fail on a bad params file or an
    # unreachable tracking server before any work
    params = load_params(params_path)
    check_tracking_store(params, Path(workdir))
    workdir = str(Path(workdir).resolve())
    results: dict = {}
    with workspace_lock(Path(workdir)):
        mark_abandoned_runs(workdir)
        for name in STAGES:
            task = run_stage.with_options(
                name=name,
                task_run_name=name,
                retries=RETRIES.get(name, 0),
                refresh_cache=not outputs_present(name, workdir),
                tags=stage_tags(name),
                timeout_seconds=TIMEOUTS.get(name, DEFAULT_TIMEOUT),
            )
            context = lineage_context() if name in CONTEXT_STAGES else None
            # a stage served from the cache needs no pre-step (it would only find its work done)
            if name in PRE_STEPS and not stage_cached(name, params, workdir, context):
                PRE_STEPS[name](params, workdir)
            results[name] = task(name, params, workdir, context)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=pipeline.__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--workdir", default=".")
    args = parser.parse_args()
    with prefect_api():
        pipeline(params_path=args.params, workdir=args.workdir)


if __name__ == "__main__":
    main()
