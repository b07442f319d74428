"""The active-learning run: accuracy against labels, one nested run per (dataset, learner,
strategy)."""

from __future__ import annotations

from pathlib import Path

from transferlab.config import Params
from transferlab.tracking.experiment_run import experiment_run
from transferlab.tracking.store import scoped_tracking


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
    with experiment_run(params, workdir, "active-learning", artifacts=artifacts, tags=tags) as run:
        for s in summary["strategies"]:
            key = (s["dataset"], s["learner"], s["strategy"])
            series: dict[str, list[tuple[int, float]]] = {}
            for p in summary["curve"]:
                if (p["dataset"], p["learner"], p["strategy"]) == key:
                    for m in ("acc_mean", "acc_std", "wilson_low", "wilson_high"):
                        series.setdefault(m, []).append((p["labels"], p[m]))
            run.arm(
                "-".join(key),
                params={"strategy": key[2], "learner": key[1], "dataset": key[0]},
                metrics={
                    k: float(v)
                    for k, v in s.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)
                },
                series=series,
                tags={"al.dataset": key[0], "al.learner": key[1]},
            )
    return run.ids
