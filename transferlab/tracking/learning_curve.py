"""The learning-curve run: accuracy against labelled images per class, one nested run per method."""

from __future__ import annotations

from pathlib import Path

from transferlab.config import Params
from transferlab.tracking.experiment_run import experiment_run
from transferlab.tracking.store import scoped_tracking


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
    with experiment_run(params, workdir, "learning-curve", artifacts=artifacts, tags=tags) as run:
        for method in dict.fromkeys(r["method"] for r in rows):
            series: dict[str, list[tuple[int, float]]] = {}
            for s in summary:
                if f"{method}_mean" in s:
                    n = s["n_per_class"]
                    series.setdefault("test_acc_mean", []).append((n, s[f"{method}_mean"]))
                    for end in ("ci_low", "ci_high"):
                        series.setdefault(f"test_acc_{end}", []).append((n, s[f"{method}_{end}"]))
                    series.setdefault("train_seconds_mean", []).append((n, s[f"{method}_seconds"]))
            for r in rows:
                if r["method"] == method:
                    series.setdefault(f"test_acc_seed{r['seed']}", []).append(
                        (r["n_per_class"], r["test_acc"])
                    )
            run.arm(
                method,
                params={
                    f"{method}.{k}": str(v) for k, v in getattr(params, method).model_dump().items()
                },
                series=series,
            )
    return run.ids
