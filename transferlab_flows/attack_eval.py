"""On-demand attack evaluation of a registered model version (the ``attack-eval`` deployment).

Example: ``prefect deployment run transferlab-attack-eval/attack-eval -p model=tiny-svm@champion``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow

from transferlab.config import load_params
from transferlab_flows.tasks.registry import attack_registered_model


@flow(name="transferlab-attack-eval", log_prints=True)
def attack_eval(model: str, params_path: str = "params.yaml", workdir: str = ".") -> dict:
    """Load ``model`` (NAME@alias or NAME/version) from MLflow, attack it on the workspace's test
    split with ``params.attack``, and log one ``attack-eval`` run."""
    params = load_params(params_path)  # once, before any work: a bad file fails here
    return attack_registered_model(model, params, str(Path(workdir).resolve()))


def main() -> None:
    parser = argparse.ArgumentParser(description=attack_eval.__doc__)
    parser.add_argument("model")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--workdir", default=".")
    args = parser.parse_args()
    attack_eval(model=args.model, params_path=args.params, workdir=args.workdir)


if __name__ == "__main__":
    main()
