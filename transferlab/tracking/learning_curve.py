"""The learning-curve run: accuracy against labelled images per class, one nested run per method."""

from __future__ import annotations

import logging
from pathlib import Path

from transferlab.config import Params
from transferlab.tracking.runs import invocation_run, log_series
from transferlab.tracking.store import experiment_id, git_state, scoped_tracking, tracking_uri

log = logging.getLogger(__name__)


@scoped_tracking
def log_learning_curve(
    params: Params,
    workdir: Path,
    *,
    rows: list[dict],
    summary: list[dict],
    artifacts: list[Path],
    tags: dict[str, str] | None = None,
) -> dict[str, str]:
    """One parent run ``learning-curve`` with a nested run per method.

    Each nested run holds ``test_acc_mean`` and its 95% interval (``test_acc_ci_low``,
    ``test_acc_ci_high``: seeds + test sampling) as series over N per class (step = N), and
    every single run's accuracy as ``test_acc_seed<k>``.
    """
    import mlflow

    uri = tracking_uri(params, workdir)
    exp_id = experiment_id(mlflow, params, workdir, uri)
    client = mlflow.MlflowClient()
    all_tags = {**git_state(workdir), **(tags or {})}
    ids = {"experiment_id": exp_id, "tracking_uri": uri}
    lc = params.learning_curve.model_dump(mode="json")
    with invocation_run(mlflow, exp_id, "learning-curve", all_tags) as (par, all_tags):
        ids["parent"] = par.info.run_id
        mlflow.log_params({f"learning_curve.{k}": str(v) for k, v in lc.items()})
        for path in artifacts:
            mlflow.log_artifact(str(path))
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            with mlflow.start_run(
                experiment_id=exp_id,
                run_name=f"learning-curve-{method}",
                nested=True,
                tags=all_tags,
            ) as child:
                ids[method] = child.info.run_id
                mlflow.log_params(
                    {
                        f"{method}.{k}": str(v)
                        for k, v in getattr(params, method).model_dump().items()
                    }
                )
                series: dict[str, list[tuple[int, float]]] = {}
                for s in summary:
                    if f"{method}_mean" in s:
                        n = s["n_per_class"]
                        series.setdefault("test_acc_mean", []).append((n, s[f"{method}_mean"]))
                        for end in ("ci_low", "ci_high"):
                            series.setdefault(f"test_acc_{end}", []).append(
                                (n, s[f"{method}_{end}"])
                            )
                        series.setdefault("train_seconds_mean", []).append(
                            (n, s[f"{method}_seconds"])
                        )
                for r in mine:
                    series.setdefault(f"test_acc_seed{r['seed']}", []).append(
                        (r["n_per_class"], r["test_acc"])
                    )
                log_series(client, child.info.run_id, series)
    log.info("logged learning curve run %s to %s", ids["parent"], uri)
    return ids
