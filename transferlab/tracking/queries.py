"""Reading the store back: the recent runs table and the ``mlflow ui`` command that serves it."""

from __future__ import annotations

from pathlib import Path

from transferlab.config import Params
from transferlab.tracking.pipeline import PIPELINE, RUN_TYPE_TAG
from transferlab.tracking.store import tracking_uri


def recent_runs(params: Params, workdir: Path, *, last: int = 5) -> list[dict]:
    """The last ``last`` pipeline runs, one row per method run, newest first.

    Each row: parent run id, start time, status, method, test accuracy, robust accuracy at the
    report eps (one column per attack) and training seconds.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(params, workdir)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return []  # opening a SQLite store creates it: reading must not write
    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        exp = client.get_experiment_by_name(params.tracking.experiment)
    except MlflowException as exc:
        raise RuntimeError(f"cannot read the MLflow store: {exc}") from None
    if exp is None:
        return []
    parents = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{RUN_TYPE_TAG}` = '{PIPELINE}'",
        order_by=["attributes.start_time DESC"],
        max_results=last,
    )
    rows = []
    # the scalar at the report eps: robust_acc_<attack>_eps_<k>
    suffix = f"_eps_{params.attack.report_eps.k}"
    for parent in parents:
        children = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        )
        for child in sorted(children, key=lambda r: r.info.run_name or ""):
            m = child.data.metrics
            row = {
                "run": parent.info.run_id[:8],
                "started": _when(parent.info.start_time),
                "status": parent.info.status,
                "method": child.info.run_name,
                "test_acc": m.get("test_acc"),
            }
            for key, value in sorted(m.items()):
                if key.startswith("robust_acc_") and key.endswith(suffix):
                    row[key.removeprefix("robust_acc_").removesuffix(suffix) + "@eps"] = value
            row["train_s"] = m.get("fit_seconds", m.get("train_seconds"))
            rows.append(row)
    return rows


def _when(ms: int | None) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp((ms or 0) / 1000).strftime("%Y-%m-%d %H:%M")


def ui_command(params: Params, workdir: Path, *, host: str, port: int) -> list[str]:
    """The ``mlflow ui`` command line that serves this workspace's store: one worker (a
    person's browser, not a team), so the UI is one server process and its children."""
    artifacts = (workdir / params.tracking.artifact_dir).resolve()
    return [
        "mlflow",
        "ui",
        "--backend-store-uri",
        tracking_uri(params, workdir),
        "--default-artifact-root",
        str(artifacts),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


# Without this the MLflow 3 server also starts job-runner processes (about 2 GB) it needs only
# for server-side jobs, which a local UI never runs.
UI_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def experiment_url(base: str, experiment_id: str) -> str:
    """A link that opens the experiment on its runs table. MLflow 3.17's UI remembers a global
    GenAI / model-training switch per browser (GenAI by default) and, from a bare experiment link,
    opens the GenAI overview whatever the experiment's kind tag says; the query names the mode."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def comparison_url(base: str, experiment_id: str, run_ids: list[str], metrics: list[str]) -> str:
    """A link to MLflow's metric view of ``metrics`` over ``run_ids`` against the step (for
    ``robust_acc_vs_eps/<attack>``, step = eps * 255): a comparison that lives in the URL, so
    it can be bookmarked and shared."""
    import json
    from urllib.parse import quote

    def arg(value) -> str:
        return quote(json.dumps(value, separators=(",", ":")), safe="")

    return (
        f"{base.rstrip('/')}/#/metric?runs={arg(run_ids)}&metric={arg(metrics[0])}"
        f"&experiments={arg([experiment_id])}&plot_metric_keys={arg(metrics)}"
        "&plot_layout=%7B%7D&x_axis=step&y_axis_scale=linear&line_smoothness=1&show_point=true"
        "&deselected_curves=%5B%5D&last_linear_y_axis_range=%5B%5D"
    )
