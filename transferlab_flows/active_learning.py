"""The active-learning experiment as a Prefect flow: the same function the CLI and
``dvc repro experiments/active_learning/dvc.yaml`` run (``transferlab.active.experiment``).

Run it with ``python -m transferlab_flows.active_learning --params params.yaml``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, task

from transferlab.config import Params, load_params
from transferlab_flows.pipeline import lineage_context


@task(name="active-learning", retries=0)
def active_learning_task(params: Params, workdir: str, context: dict[str, str]) -> dict:
    from transferlab.active.experiment import active_learning_experiment

    return active_learning_experiment(params, Path(workdir), context=context)


@flow(name="transferlab-active-learning", log_prints=True)
def active_learning(params_path: str = "params.yaml", workdir: str = ".") -> dict:
    """Every query strategy under a labelling budget; returns paths, timings and MLflow ids."""
    params = load_params(params_path)  # once, before any work: a bad file fails here
    return active_learning_task(params, str(Path(workdir).resolve()), lineage_context())


def main() -> None:
    parser = argparse.ArgumentParser(description=active_learning.__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--workdir", default=".")
    args = parser.parse_args()
    active_learning(params_path=args.params, workdir=args.workdir)


if __name__ == "__main__":
    main()
