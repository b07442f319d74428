"""Attack work as a Prefect map over (model, batch): each task stores its finished shards.

The attack stage (``transferlab.stages.attack``) then reads the shards back instead of
recomputing them. A killed flow resumes: shards already in ``attack.work_dir`` are skipped, so
no finished batch is attacked twice.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task, unmapped

from transferlab.config import load_params
from transferlab.progress import in_stage
from transferlab.robustness import num_batches, sweep_batch
from transferlab_flows.tasks.stages import retry_transient


@task(retries=1, retry_delay_seconds=[5], retry_condition_fn=retry_transient)
def attack_batch(params_path: str, workdir: str, model: str, batch: int) -> int:
    """Attack batch ``batch`` of ``model`` with every attack and eps; returns images done."""
    with in_stage("attack"):
        return sweep_batch(load_params(params_path), Path(workdir), model, batch)


def map_attack_batches(params_path: str, workdir: str) -> list[int]:
    """Submit one ``attack_batch`` per model and batch and wait for them (call inside a flow)."""
    params = load_params(params_path)
    root = Path(workdir)
    pairs = [
        (model, batch)
        for model in params.attack.models
        for batch in range(num_batches(params, root))
    ]
    futures = attack_batch.map(
        unmapped(params_path), unmapped(workdir), [m for m, _ in pairs], [b for _, b in pairs]
    )
    return futures.result()
