"""The active-learning experiment as a Prefect flow: the same function the CLI and
``dvc repro experiments/active_learning/dvc.yaml`` run (``transferlab.active.experiment``).

Run it with ``python -m transferlab_flows.active_learning --params params.yaml``.
"""

from __future__ import annotations

from pathlib import Path

from transferlab.config import Params
from transferlab_flows.experiment import experiment_flow, main


def _active_learning(params: Params, workdir: Path, context: dict[str, str]) -> dict:
    from transferlab.active.experiment import active_learning_experiment

    return active_learning_experiment(params, workdir, context=context)


active_learning = experiment_flow(
    "active-learning",
    _active_learning,
    "Every query strategy under a labelling budget; returns paths, timings and MLflow ids.",
)

if __name__ == "__main__":
    main(active_learning)
