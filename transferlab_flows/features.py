"""The feature stage spread over workers: a flow that maps the shard task over the manifest.

The task runner comes from the ``runner`` section of params.yaml: ``local`` (threads, one shard
at a time), ``dask`` (prefect-dask; a LocalCluster, or the cluster at ``address``) or ``ray``
(prefect-ray; a local Ray, or the cluster at ``address``). Each shard fills the shared
content-addressed cache; the ``features`` stage then assembles ``features/features.npz`` from it,
so the runner cannot change the features, only where they are computed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from transferlab.cache import record_run
from transferlab.config import Params, RunnerParams
from transferlab_flows.tasks.stages import run_feature_shard


def n_shards(runner: RunnerParams) -> int:
    """Shards to map over: ``runner.shards``, else 1 locally and one per worker on a cluster."""
    if runner.shards is not None:
        return runner.shards
    return 1 if runner.kind == "local" else runner.workers


def build_task_runner(runner: RunnerParams):
    """The Prefect task runner that ``runner`` names.

    Raises:
        RuntimeError: the engine's Prefect integration is not installed.
    """
    if runner.kind == "local":
        # torch already uses every core for one batch; shards side by side would only contend
        return ThreadPoolTaskRunner(max_workers=1)
    if runner.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if runner.address:
            return DaskTaskRunner(address=runner.address)
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": runner.workers,
                # one process per worker, one thread each: torch threads per worker come from
                # the nanny's OMP_NUM_THREADS=1, so workers do not oversubscribe the cores
                "threads_per_worker": 1,
                "processes": True,
                # never bind :8787 or write scratch files to a shared /tmp folder
                "dashboard_address": ":0",
                "local_directory": tempfile.mkdtemp(prefix="transferlab-dask-"),
            },
        )
    # one node on loopback: on Linux Ray swaps 127.0.0.1 for the machine's address and binds
    # every interface unless it is told the cluster is one machine (read once, when ray is imported)
    if not runner.address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise RuntimeError(
            "runner.kind: ray needs prefect-ray; install it with `pip install prefect-ray`"
        ) from None
    if runner.address:
        return RayTaskRunner(address=runner.address)
    return RayTaskRunner(
        # "local" starts a new Ray: never the cluster RAY_ADDRESS or /tmp/ray names
        address="local",
        init_kwargs={
            "num_cpus": runner.workers,
            "include_dashboard": False,
            # never write sessions, logs and spilled objects to the shared /tmp/ray
            "_temp_dir": tempfile.mkdtemp(prefix="transferlab-ray-"),
        },
    )


def scratch_dir(task_runner) -> str | None:
    """The scratch folder ``build_task_runner`` made for a local Dask or Ray cluster, if any."""
    dask = getattr(task_runner, "cluster_kwargs", None) or {}
    ray = getattr(task_runner, "init_kwargs", None) or {}
    return dask.get("local_directory") or ray.get("_temp_dir")


@contextmanager
def restored_environ() -> Iterator[None]:
    """Put os.environ back as it was: a local Dask cluster writes its workers' settings into
    this process (OMP_NUM_THREADS=1, ...), and later stages' subprocesses would inherit them."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        os.environ.update(saved)


@flow(name="transferlab-features")
def feature_shards(params: Params, workdir: str, shards: int) -> list[dict]:
    """Fill the feature cache for every shard of the manifest, in parallel on the task runner."""
    futures = run_feature_shard.map(
        unmapped(params), unmapped(workdir), list(range(shards)), unmapped(shards)
    )
    return [f.result() for f in futures]


def run_feature_shards(params: Params, workdir: str) -> list[dict]:
    """Run ``feature_shards`` on the task runner that params.yaml's ``runner`` section names,
    and record the summed hit rate in the cache folder (``transferlab cache info``)."""
    runner = params.runner
    with restored_environ():
        task_runner = build_task_runner(runner)
        try:
            results = feature_shards.with_options(task_runner=task_runner)(
                params, workdir, n_shards(runner)
            )
        finally:
            scratch = scratch_dir(task_runner)
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)
    images = sum(r["images"] for r in results)
    hits = sum(r["cache_hits"] for r in results)
    record_run(
        Path(workdir) / params.features.cache_dir,
        {
            "images": images,
            "hits": hits,
            "misses": images - hits,
            "hit_rate": hits / images if images else 1.0,
            "shards": len(results),
            "runner": runner.kind,
        },
        name="shards",
    )
    return results
