"""One Prefect task that runs any stage of ``transferlab.stages``.

The result cache makes a re-run skip stages whose inputs did not change: the key digests the
stage's params sections, the content of its input files, the library's source and the workspace.
The flow refreshes the cache for a stage whose outputs are missing, so it runs and is stored.

Tasks take the flow's frozen ``Params`` (parsed once per flow run), never a path to re-read.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.results import get_result_store

import transferlab
from transferlab.config import Params, ParamsError
from transferlab.data.sources import DataSourceError
from transferlab.lineage import run_kind
from transferlab.methods import METHODS
from transferlab.progress import in_stage
from transferlab.stages import STAGES
from transferlab.workspace import WorkspaceBusy

# Stages that take the flow run's lineage context (the MLflow tags; whether the gate may promote).
CONTEXT_STAGES = ("report", "gate")

# Stages that reach the network (a remote source, the tracking server) retry with backoff.
RETRIES = {"pull": 2, "report": 2}
# The registry calls of the gate reach the tracking server too.
RETRIES["gate"] = 2

# Errors a retry cannot fix: the same input fails the same way (bad params, a missing folder,
# a checksum mismatch, a corrupt file). The library retries its own network calls (downloads,
# S3) before it raises DataSourceError, so that one has had its retries too.
DETERMINISTIC = (
    ParamsError,
    DataSourceError,
    ValueError,
    LookupError,
    FileNotFoundError,
    NotADirectoryError,
    WorkspaceBusy,
)


def retry_transient(task, task_run, state) -> bool:  # noqa: ARG001 - Prefect's signature
    """Prefect ``retry_condition_fn``: retry a failed task unless its error is deterministic."""
    return not isinstance(state.data, DETERMINISTIC)


# Stages that saturate the CPU/GPU carry this tag; a tag concurrency limit on the Prefect server
# (`prefect concurrency-limit create heavy 1`, done by infra/bootstrap.sh) keeps concurrent flow
# runs (a nightly run and an on-demand attack-eval) from oversubscribing one worker machine.
HEAVY_TAG = "heavy"
HEAVY_STAGES = {"features", *METHODS, "attack"}
NETWORK_TAG = "network"


def stage_tags(stage: str) -> set[str]:
    """Prefect tags for a stage's task run: ``heavy`` and/or ``network``, plus the stage name."""
    tags = {f"stage:{stage}"}
    if stage in HEAVY_STAGES:
        tags.add(HEAVY_TAG)
    if stage in RETRIES:
        tags.add(NETWORK_TAG)
    return tags


# Upper bounds per stage (seconds), so a hung download or server call fails the run instead of
# holding the worker forever; generous for CPU-only machines.
TIMEOUTS = {"pull": 3600, "report": 900, "gate": 300}
DEFAULT_TIMEOUT = 6 * 3600


def _fingerprint(path: Path, h: hashlib._Hash) -> None:
    """Content for files; (name, size, mtime) for folders, which can hold thousands of images."""
    if path.is_file():
        h.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    elif path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        h.update(f"missing:{path}".encode())


@functools.cache  # the library's source does not change under a running process
def _code_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(Path(transferlab.__file__).parent.rglob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()


def outputs_present(stage: str, workdir: str | Path) -> bool:
    """Whether the stage's outputs are all there (and, for pull, whole: a cached result must
    not stand for a dataset with an image deleted since, or the next stage fails on it)."""
    s = STAGES[stage]
    if not all((Path(workdir) / out).exists() for out in (*s.outs, *s.metrics, *s.plots)):
        return False
    if stage == "pull":
        from transferlab.data.pull import dataset_problem

        return dataset_problem(Path(workdir) / "data") is None
    return True


def stage_cache_key(context: TaskRunContext | None, parameters: dict) -> str:
    stage = STAGES[parameters["stage"]]
    root = Path(parameters["workdir"]).resolve()
    params: Params = parameters["params"]
    h = hashlib.sha256()
    h.update(f"{stage.name}|{root}|{params.section_hash(*stage.params)}|{_code_digest()}".encode())
    if stage.name in CONTEXT_STAGES:
        # an ad-hoc run's gate must not stand in for the deployment's, which may move the alias
        h.update(run_kind(parameters.get("context"))["transferlab.run_kind"].encode())
    for dep in stage.deps:
        _fingerprint(root / dep, h)
    if stage.name == "pull":
        _fingerprint(Path(params.data.source.path), h)
    return h.hexdigest()


@task(
    cache_key_fn=stage_cache_key,
    persist_result=True,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_transient,
)
def run_stage(
    stage: str, params: Params, workdir: str, context: dict[str, str] | None = None
) -> dict:
    """Run one stage on the workspace ``workdir``; returns the stage's summary."""
    fn = STAGES[stage].run
    root = Path(workdir)
    with in_stage(stage):
        return fn(params, root, context=context) if stage in CONTEXT_STAGES else fn(params, root)


def stage_cached(
    stage: str, params: Params, workdir: str, context: dict[str, str] | None = None
) -> bool:
    """Whether ``run_stage`` would be served from the result cache (call inside a flow): its
    outputs are there and a result is stored under its key. The flow then skips the stage's
    pre-steps (feature shards, attack batches), which would only find their work done."""
    if not outputs_present(stage, workdir):
        return False
    parameters = {"stage": stage, "params": params, "workdir": workdir, "context": context}
    store = get_result_store().update_for_task(run_stage, _sync=True)
    return store.exists(stage_cache_key(None, parameters))


# ------------------------------------------------------------------ feature shards


@task(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2, retry_condition_fn=retry_transient)
def run_feature_shard(params: Params, workdir: str, shard_index: int, n_shards: int) -> dict:
    """Fill the feature cache for one manifest shard (no result cache: the feature cache is one).

    Runs wherever the flow's task runner puts it (a thread, a Dask or Ray worker): it reads the
    workspace and writes the shared cache folder, so both must be reachable from that worker.
    """
    from transferlab.stages import features_shard

    with in_stage("features"):
        return features_shard(params, Path(workdir), shard_index, n_shards)
