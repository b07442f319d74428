"""Attack work as a Prefect map over (model, batch): each task stores its finished shards.

The attack stage (``transferlab.stages.attack``) then reads the shards back instead of
recomputing them. A killed flow resumes: shards already in ``attack.work_dir`` are skipped, so
no finished batch is attacked twice.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task, unmapped

from transferlab.config import Params
from transferlab.progress import in_stage
from transferlab_flows.tasks.stages import retry_transient


@task(retries=1, retry_delay_seconds=[5], retry_condition_fn=retry_transient)
def attack_batch(params: Params, workdir: str, model: str, batch: int) -> int:
    """Attack batch ``batch`` of ``model`` with every attack and eps; returns images done."""
    from transferlab.robustness import sweep_batch  # torch: only where a batch is attacked

    with in_stage("attack"):
        return sweep_batch(params, Path(workdir), model, batch)


def map_attack_batches(params: Params, workdir: str) -> list[int]:
    """Submit one ``attack_batch`` per model and batch and wait for them (call inside a flow)."""
    from transferlab.robustness import num_batches

    root = Path(workdir)
    pairs = [
        (model, batch)
        for model in params.attack.models
        for batch in range(num_batches(params, root))
    ]
    futures = attack_batch.map(
        unmapped(params), unmapped(workdir), [m for m, _ in pairs], [b for _, b in pairs]
    )
    return futures.result()
