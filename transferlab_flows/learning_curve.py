"""The learning-curve experiment as a Prefect flow: the same function the CLI and
``dvc repro experiments/learning_curve`` run (``transferlab.experiments.learning_curve``).

Run it with ``python -m transferlab_flows.learning_curve --params params.yaml``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, task

from transferlab.config import Params, load_params
from transferlab_flows.pipeline import lineage_context


@task(name="learning-curve", retries=0)
def learning_curve_task(params: Params, workdir: str, context: dict[str, str]) -> dict:
    from transferlab.experiments.learning_curve import learning_curve_experiment

    result = learning_curve_experiment(params, Path(workdir), context=context)
    return {k: v for k, v in result.items() if k != "summary"} | {"summary": result["summary"]}


@flow(name="transferlab-learning-curve", log_prints=True)
def learning_curve(params_path: str = "params.yaml", workdir: str = ".") -> dict:
    """svm vs top vs full on the same few-shot subsets; returns paths, summary and MLflow ids."""
    params = load_params(params_path)  # once, before any work: a bad file fails here
    return learning_curve_task(params, str(Path(workdir).resolve()), lineage_context())


def main() -> None:
    parser = argparse.ArgumentParser(description=learning_curve.__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--workdir", default=".")
    args = parser.parse_args()
    learning_curve(params_path=args.params, workdir=args.workdir)


if __name__ == "__main__":
    main()
