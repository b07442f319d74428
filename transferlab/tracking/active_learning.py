"""The active-learning run: accuracy against labels, one nested run per (dataset, learner,
strategy)."""

from __future__ import annotations

import logging
from pathlib import Path

from transferlab.config import Params
from transferlab.tracking.runs import invocation_run, log_series
from transferlab.tracking.store import experiment_id, git_state, scoped_tracking, tracking_uri

log = logging.getLogger(__name__)


@scoped_tracking
def log_active_learning(
    params: Params,
    workdir: Path,
    *,
    summary: dict,
    artifacts: list[Path],
    tags: dict[str, str] | None = None,
) -> dict[str, str]:
    """One parent run ``active-learning`` and a nested run per (dataset, learner, strategy).

    Each nested run holds ``acc_mean``, ``acc_std``, ``acc_wilson_low``/``_high`` as series over
    the number of labels (step = labels), and the AUC and label counts as plain metrics.
    """
    import mlflow

    uri = tracking_uri(params, workdir)
    exp_id = experiment_id(mlflow, params, workdir, uri)
    client = mlflow.MlflowClient()
    all_tags = {**git_state(workdir), **(tags or {})}
    ids = {"experiment_id": exp_id, "tracking_uri": uri}
    al = params.active_learning.model_dump(mode="json")
    with invocation_run(mlflow, exp_id, "active-learning", all_tags) as (par, all_tags):
        ids["parent"] = par.info.run_id
        mlflow.log_params({f"active_learning.{k}": str(v) for k, v in al.items()})
        for path in artifacts:
            mlflow.log_artifact(str(path))
        for s in summary["strategies"]:
            key = (s["dataset"], s["learner"], s["strategy"])
            name = "-".join(key)
            with mlflow.start_run(
                experiment_id=exp_id,
                run_name=f"active-learning-{name}",
                nested=True,
                tags={**all_tags, "al.dataset": key[0], "al.learner": key[1]},
            ) as child:
                ids[name] = child.info.run_id
                mlflow.log_params({"strategy": key[2], "learner": key[1], "dataset": key[0]})
                mlflow.log_metrics(
                    {
                        k: float(v)
                        for k, v in s.items()
                        if isinstance(v, int | float) and not isinstance(v, bool)
                    }
                )
                series: dict[str, list[tuple[int, float]]] = {}
                for p in summary["curve"]:
                    if (p["dataset"], p["learner"], p["strategy"]) != key:
                        continue
                    for m in ("acc_mean", "acc_std", "wilson_low", "wilson_high"):
                        series.setdefault(m, []).append((p["labels"], p[m]))
                log_series(client, child.info.run_id, series)
    log.info("logged active-learning run %s to %s", ids["parent"], uri)
    return ids
