"""A library experiment as a Prefect flow, the shape ``learning_curve`` and ``active_learning``
share: the flow parses the params once (a bad file fails before any work), then one task runs
the experiment on the workspace with the flow run's lineage (its MLflow tags); ``main`` is the
flow's ``python -m`` entry."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from prefect import Flow, flow, task

from transferlab.config import Params, load_params
from transferlab_flows.pipeline import lineage_context

# (params, workspace, lineage context) -> the experiment's result (paths, timings, MLflow ids)
Experiment = Callable[[Params, Path, dict[str, str]], dict]


def experiment_flow(name: str, experiment: Experiment, description: str) -> Flow:
    """The flow ``transferlab-<name>`` (parameters ``params_path``, ``workdir``) whose one task,
    ``<name>``, runs ``experiment`` on the resolved ``workdir``."""

    @task(name=name, retries=0)
    def run_task(params: Params, workdir: str, context: dict[str, str]) -> dict:
        return experiment(params, Path(workdir), context)

    @flow(name=f"transferlab-{name}", description=description, log_prints=True)
    def run_flow(params_path: str = "params.yaml", workdir: str = ".") -> dict:
        params = load_params(params_path)  # once, before any work: a bad file fails here
        return run_task(params, str(Path(workdir).resolve()), lineage_context())

    return run_flow


def main(experiment: Flow) -> None:
    """Run ``experiment`` with ``--params`` and ``--workdir`` from the command line."""
    parser = argparse.ArgumentParser(description=experiment.description)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--workdir", default=".")
    args = parser.parse_args()
    experiment(params_path=args.params, workdir=args.workdir)
