"""The run of a side experiment (learning curve, active learning): one parent run with the
experiment's section as params and its output files as artifacts, and a nested run per
compared arm holding its params, metrics and series."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transferlab.config import Params
from transferlab.tracking.runs import invocation_run, log_series
from transferlab.tracking.store import experiment_id, git_state, tracking_uri

log = logging.getLogger(__name__)


class ExperimentRun:
    """The open parent run; ``ids`` maps experiment_id, tracking_uri, parent and each arm to
    its run id."""

    def __init__(self, mlflow, exp_id: str, name: str, tags: dict[str, str], ids: dict):
        self._mlflow, self._exp_id, self._name, self._tags = mlflow, exp_id, name, tags
        self._client = mlflow.MlflowClient()
        self.ids = ids

    def arm(
        self,
        key: str,
        *,
        params: dict[str, str],
        series: dict[str, list[tuple[int, float]]],
        metrics: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """A nested run ``<experiment>-<key>``: ``params``, ``metrics`` and every point of
        ``series`` (name -> [(step, value)])."""
        mlflow = self._mlflow
        with mlflow.start_run(
            experiment_id=self._exp_id,
            run_name=f"{self._name}-{key}",
            nested=True,
            tags={**self._tags, **(tags or {})},
        ) as child:
            self.ids[key] = child.info.run_id
            mlflow.log_params(params)
            if metrics is not None:
                mlflow.log_metrics(metrics)
            log_series(self._client, child.info.run_id, series)


@contextmanager
def experiment_run(
    params: Params,
    workdir: Path,
    name: str,
    *,
    artifacts: list[Path],
    tags: dict[str, str] | None = None,
) -> Iterator[ExperimentRun]:
    """The parent run ``name`` (``learning-curve``: section ``learning_curve``), its params
    ``<section>.<key>`` and ``artifacts`` logged; the caller adds the arms. Call it inside
    ``store.scoped_tracking``."""
    import mlflow

    uri = tracking_uri(params, workdir)
    exp_id = experiment_id(mlflow, params, workdir, uri)
    ids = {"experiment_id": exp_id, "tracking_uri": uri}
    section = name.replace("-", "_")
    values = getattr(params, section).model_dump(mode="json")
    with invocation_run(mlflow, exp_id, name, {**git_state(workdir), **(tags or {})}) as (
        parent,
        all_tags,
    ):
        ids["parent"] = parent.info.run_id
        mlflow.log_params({f"{section}.{k}": str(v) for k, v in values.items()})
        for path in artifacts:
            mlflow.log_artifact(str(path))
        yield ExperimentRun(mlflow, exp_id, name, all_tags, ids)
    log.info("logged %s run %s to %s", name, ids["parent"], uri)
