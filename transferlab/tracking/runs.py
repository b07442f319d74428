"""Run lifecycle: a top-level run per logging call that always ends (FAILED on an error or a
signal), orphaned runs of dead processes closed, and batched metric series."""

from __future__ import annotations

import logging
import os
import uuid
from contextlib import contextmanager

log = logging.getLogger(__name__)

# Every run one logging call creates carries the same random value under this tag, so a failed
# call can find (and end) its runs even when it never got hold of their ids.
INVOCATION_TAG = "transferlab.invocation"


def host() -> str:
    """This machine's name (with the pid, it tells whether a RUNNING run's process lives)."""
    import socket

    return socket.gethostname()


@contextmanager
def invocation_run(mlflow, experiment_id: str, run_name: str, tags: dict[str, str]):
    """A top-level run for one logging call, tagged ``INVOCATION_TAG`` with a fresh token; if
    the block fails, every run still open with that tag ends FAILED (``_failed_runs_end``).

    Yields the run and its tags (token included): nested runs take them, so they are covered.
    """
    tags = {**tags, INVOCATION_TAG: uuid.uuid4().hex}
    with (
        _failed_runs_end(mlflow, experiment_id, tags[INVOCATION_TAG]),
        mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run,
    ):
        yield run, tags


@contextmanager
def _failed_runs_end(mlflow, experiment_id: str, token: str):
    """If the block fails (an error, Ctrl-C, SIGTERM turned into KeyboardInterrupt), end FAILED
    every run it created that is still open: those tagged ``INVOCATION_TAG: token``.

    The ``with mlflow.start_run()`` blocks close their own runs, except in one window: a signal
    landing after MLflow created a run but before its ``with`` block was entered. Such a run is
    either unknown to the fluent stack (still RUNNING in the store) or on top of it, where the
    enclosing block's exit ends it instead of the parent and leaves the parent open. So unwind
    the fluent stack back to where it was, then ask the store for the token's runs still open.
    """
    outer = mlflow.active_run()
    outer_id = outer.info.run_id if outer is not None else None
    try:
        yield
    except BaseException:
        try:
            _end_open_runs(mlflow, experiment_id, token, outer_id)
        except Exception as exc:  # noqa: BLE001 - the original error matters more
            log.warning("could not mark the interrupted MLflow runs FAILED: %s", exc)
        raise


def _end_open_runs(mlflow, experiment_id: str, token: str, outer_id: str | None) -> list[str]:
    failed = "FAILED"
    ended = []
    while (run := mlflow.active_run()) is not None and run.info.run_id != outer_id:
        ended.append(run.info.run_id)
        mlflow.end_run(failed)
    client = mlflow.MlflowClient()
    still_open = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{INVOCATION_TAG}` = '{token}'",
    )
    for run in still_open:
        client.set_terminated(run.info.run_id, status=failed)
        ended.append(run.info.run_id)
    if ended:
        log.warning("marked %d interrupted MLflow run(s) FAILED: %s", len(ended), ended)
    return ended


def close_orphaned_runs(client, experiment_id: str, workspace: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this workspace whose process is gone (a SIGKILL or a
    power cut cannot close its own run). Returns their ids."""
    closed = []
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"attributes.status = 'RUNNING' and tags.`transferlab.workspace` = '{workspace}'"
        ),
    )
    for run in runs:
        tags = run.data.tags
        pid = int(tags.get("transferlab.pid", "0") or 0)
        if tags.get("transferlab.host") == host() and pid and _alive(pid):
            continue
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    if closed:
        log.warning("marked %d interrupted MLflow run(s) KILLED: %s", len(closed), closed)
    return closed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def log_series(client, run_id: str, series: dict[str, list[tuple[int, float]]]) -> None:
    """Every point of every series in batched calls (one request per 1000 metrics)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    points = [
        Metric(key, float(value), now, int(step))
        for key, pts in series.items()
        for step, value in pts
        if value is not None
    ]
    for i in range(0, len(points), 1000):
        client.log_batch(run_id, metrics=points[i : i + 1000])
