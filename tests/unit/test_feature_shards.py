"""The shard stage fills the cache; the features stage then only assembles features.npz."""

from __future__ import annotations

import os

import numpy as np

from tests.conftest import tiny_params, write_workspace
from transferlab import cache, stages
from transferlab.config import Params


def test_shards_fill_the_cache_and_the_stage_assembles_the_same_features(tmp_path, tiny_dataset):
    params = Params.model_validate(tiny_params(tiny_dataset))
    direct = write_workspace(tmp_path / "direct", {})
    sharded = write_workspace(tmp_path / "sharded", {})
    for ws in (direct, sharded):
        stages.pull(params, ws)
    stages.features(params, direct)

    results = [stages.features_shard(params, sharded, i, 3) for i in range(3)]
    assert sum(r["images"] for r in results) == 24 and all(r["cache_hits"] == 0 for r in results)
    summary = stages.features(params, sharded)
    assert summary["cache_hits"] == summary["images"] == 24
    with np.load(direct / stages.FEATURES) as a, np.load(sharded / stages.FEATURES) as b:
        assert (a["sha256"] == b["sha256"]).all()
        np.testing.assert_allclose(a["features"], b["features"], rtol=1e-5, atol=1e-5)
    got = cache.info(sharded / params.features.cache_dir)
    assert got["last_run"]["features"]["hit_rate"] == 1.0
    (space,) = got["spaces"].values()
    assert (
        space["entries"] == 24
        and space["shards"] == 3
        and space["backbone"] == "efficientnet_lite0"
    )


def test_shard_membership_is_by_content_so_new_images_never_move_old_ones():
    import hashlib

    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(200)]
    assert {stages.shard_of(s, 4) for s in shas} == {0, 1, 2, 3}
    assert all(stages.shard_of(s, 4) == int(s[:8], 16) % 4 for s in shas)


def test_runner_section_picks_the_task_runner_and_shard_count(monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner
    from prefect_ray import RayTaskRunner

    from transferlab.config import RunnerParams
    from transferlab_flows.features import build_task_runner, n_shards, scratch_dir

    local = RunnerParams()
    assert isinstance(build_task_runner(local), ThreadPoolTaskRunner) and n_shards(local) == 1
    dask = RunnerParams(kind="dask", workers=3)
    runner = build_task_runner(dask)
    assert isinstance(runner, DaskTaskRunner) and n_shards(dask) == 3
    # never the default dashboard port or a shared scratch folder
    assert runner.cluster_kwargs["dashboard_address"] == ":0"
    assert "transferlab-dask-" in runner.cluster_kwargs["local_directory"]
    remote = build_task_runner(RunnerParams(kind="dask", address="tcp://127.0.0.1:1"))
    assert remote.address == "tcp://127.0.0.1:1"
    ray = build_task_runner(RunnerParams(kind="ray", address="ray://127.0.0.1:1", shards=5))
    assert isinstance(ray, RayTaskRunner) and ray.address == "ray://127.0.0.1:1"
    assert n_shards(RunnerParams(kind="ray", shards=5)) == 5
    # a local Ray of its own, on loopback, without a dashboard or the shared /tmp/ray
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    local_ray = build_task_runner(RunnerParams(kind="ray", workers=3))
    assert local_ray.address == "local" and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert local_ray.init_kwargs["num_cpus"] == 3 and not local_ray.init_kwargs["include_dashboard"]
    assert "transferlab-ray-" in local_ray.init_kwargs["_temp_dir"]
    assert scratch_dir(local_ray) == local_ray.init_kwargs["_temp_dir"]
    assert scratch_dir(runner) == runner.cluster_kwargs["local_directory"]
    for made in (scratch_dir(local_ray), scratch_dir(runner)):
        os.rmdir(made)
