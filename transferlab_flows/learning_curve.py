"""The learning-curve experiment as a Prefect flow: the same function the CLI and
``dvc repro experiments/learning_curve`` run (``transferlab.experiments.learning_curve``).

Run it with ``python -m transferlab_flows.learning_curve --params params.yaml``.
"""

from __future__ import annotations

from pathlib import Path

from transferlab.config import Params
from transferlab_flows.experiment import experiment_flow, main


def _learning_curve(params: Params, workdir: Path, context: dict[str, str]) -> dict:
    from transferlab.experiments.learning_curve import learning_curve_experiment

    result = learning_curve_experiment(params, workdir, context=context)
    return {k: v for k, v in result.items() if k != "summary"} | {"summary": result["summary"]}


learning_curve = experiment_flow(
    "learning-curve",
    _learning_curve,
    "svm vs top vs full on the same few-shot subsets; returns paths, summary and MLflow ids.",
)

if __name__ == "__main__":
    main(learning_curve)
