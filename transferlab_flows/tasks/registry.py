"""Prefect tasks that work on the model registry rather than on workspace files."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from transferlab.config import Params
from transferlab.stages import attack_registered
from transferlab_flows.tasks.stages import HEAVY_TAG, NETWORK_TAG, retry_transient


# No result cache: the same alias can point at a new version tomorrow.
@task(
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=retry_transient,
    timeout_seconds=6 * 3600,
    tags={HEAVY_TAG, NETWORK_TAG, "stage:attack-eval"},
)
def attack_registered_model(model: str, params: Params, workdir: str) -> dict:
    """Attack the registered model ``model`` (``NAME@alias`` / ``NAME/version``) and log it."""
    return attack_registered(params, Path(workdir), model=model)
