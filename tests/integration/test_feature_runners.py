"""Feature shards on real Dask and Ray clusters give the local features (float tolerance)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, tiny_params, write_workspace
from transferlab import stages
from transferlab.config import Params, load_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def restore_environ():
    """Each test leaves os.environ as it found it, even when it fails halfway: later modules'
    subprocesses would inherit a leak. The same guard the flow puts around its runners."""
    from transferlab_flows.features import restored_environ

    with restored_environ():
        yield


def wait_for_workers(address: str, n: int, timeout: float = 120) -> None:
    from distributed import Client

    with Client(address, timeout=timeout) as client:
        client.wait_for_workers(n, timeout=timeout)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """A real `dask scheduler` and 2 `dask worker` processes on 127.0.0.1."""
    scratch = tmp_path_factory.mktemp("dask")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    # the workers import transferlab_flows/ and transferlab/ from this checkout
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    bindir = Path(sys.executable).parent
    procs = [
        subprocess.Popen(
            [
                bindir / "dask",
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-dashboard",
            ],
            env=env,
            cwd=scratch,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    for i in range(2):
        procs.append(
            subprocess.Popen(
                [
                    bindir / "dask",
                    "worker",
                    address,
                    "--host",
                    "127.0.0.1",
                    "--nthreads",
                    "1",
                    "--no-dashboard",
                    "--local-directory",
                    str(scratch / f"w{i}"),
                    "--name",
                    f"w{i}",
                ],
                env=env,
                cwd=scratch,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    try:
        wait_for_workers(address, 2)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_env():
    """Ray on loopback only, without usage stats, with its auth token in the environment instead
    of ~/.ray/auth_token. Set before this process imports ray, which reads them then."""
    with pytest.MonkeyPatch.context() as mp:
        # one node: Ray keeps 127.0.0.1 instead of swapping in the machine's address
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("RAY_AUTH_MODE", "token")
        mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
        mp.delenv("RAY_ADDRESS", raising=False)
        yield


@pytest.fixture(scope="module")
def ray_head(ray_env):
    """A real `ray start --head` on 127.0.0.1 with 2 CPUs; yields its Ray Client address."""
    # short: Ray's unix sockets live under it and their paths must stay under 108 bytes
    scratch = Path(tempfile.mkdtemp(prefix="transferlab-ray-"))
    port, client_port = free_port(), free_port()
    env = {
        **os.environ,
        # the workers import transferlab_flows/ and transferlab/ from this checkout
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        # the Ray Client proxy forks a server per client while its gRPC threads run; with gRPC's
        # fork handlers on, about 1 in 5 of those servers died at birth here (ray 2.60, grpcio
        # 1.85): "Starting Ray client server failed", empty logs
        "GRPC_ENABLE_FORK_SUPPORT": "false",
    }
    head = subprocess.Popen(
        [
            Path(sys.executable).parent / "ray",
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--ray-client-server-port",
            str(client_port),
            "--num-cpus",
            "2",
            "--include-dashboard",
            "false",
            "--disable-usage-stats",
            "--temp-dir",
            str(scratch),
        ],
        env=env,
        cwd=scratch,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # its own process group: the teardown can end the head and everything it started
        start_new_session=True,
    )
    try:
        # `ray start` writes the cluster's address once the head is up
        deadline = time.monotonic() + 120
        while not (scratch / "ray_current_cluster").exists():
            assert head.poll() is None, f"ray start exited with {head.returncode}"
            assert time.monotonic() < deadline, "the Ray head did not start in 120 s"
            time.sleep(0.2)
        yield f"ray://127.0.0.1:{client_port}"
    finally:
        head.terminate()  # `ray start --block` stops its processes on SIGTERM
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
        with contextlib.suppress(ProcessLookupError):  # whatever outlived it
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="module")
def local_features(tmp_path_factory, tiny_dataset) -> np.ndarray:
    params = Params.model_validate(tiny_params(tiny_dataset))
    ws = write_workspace(tmp_path_factory.mktemp("local"), {})
    stages.pull(params, ws)
    stages.features(params, ws)
    with np.load(ws / stages.FEATURES) as z:
        return z["features"]


def run_through(ws: Path, tiny_dataset, runner: dict) -> tuple[dict, np.ndarray, list[dict]]:
    from transferlab_flows.features import run_feature_shards

    write_workspace(ws, tiny_params(tiny_dataset, runner=runner))
    params = load_params(ws / "params.yaml")
    stages.pull(params, ws)
    shards = run_feature_shards(params, str(ws))
    summary = stages.features(params, ws)
    with np.load(ws / stages.FEATURES) as z:
        return summary, z["features"], shards


# runner -> (the fixture giving its cluster address, or None; the params.yaml runner section)
RUNNERS = {
    "external-dask": ("dask_cluster", lambda at: {"kind": "dask", "address": at, "shards": 2}),
    "local-dask": (None, lambda _: {"kind": "dask", "workers": 2}),
    "local-ray": ("ray_env", lambda _: {"kind": "ray", "workers": 2}),
    "external-ray": ("ray_head", lambda at: {"kind": "ray", "address": at, "shards": 2}),
}


@pytest.mark.parametrize("name", list(RUNNERS))
def test_runner_gives_the_local_features(
    name, request, tmp_path, tiny_dataset, prefect_api, local_features
):
    fixture, runner = RUNNERS[name]
    cluster = request.getfixturevalue(fixture) if fixture else None
    before = dict(os.environ)
    summary, feats, shards = run_through(tmp_path / "ws", tiny_dataset, runner(cluster))
    assert len(shards) == 2 and sum(s["images"] for s in shards) == 24
    # every image was computed by the runner's workers; the stage only assembled
    assert summary["cache_hits"] == summary["images"] == 24
    np.testing.assert_allclose(feats, local_features, rtol=1e-4, atol=1e-5)
    # a local cluster's worker settings (OMP_NUM_THREADS=1, ...) do not stay in this process
    assert dict(os.environ) == before
