"""Faults while running: signals, a second run, a full disk, a dead server; plus secrets and
determinism. Each case says what must stay intact."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import tiny_params, write_workspace
from tests.reliability.cases import Case
from tests.reliability.conftest import (
    cli,
    error_lines,
    leftovers,
    signal_and_wait,
    start_stage,
    tree_digest,
    wait_for,
)

pytestmark = pytest.mark.slow


def _shards_load(cache: Path) -> int:
    n = 0
    for shard in cache.rglob("shard-*.npz"):
        with np.load(shard) as z:
            assert len(z["sha256"]) == len(z["features"])
        n += 1
    return n


def _features(ws: Path) -> np.ndarray:
    with np.load(ws / "features/features.npz") as z:
        return z["features"]


def _mlflow_runs(ws: Path, experiment: str = "tiny"):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlruns.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


@pytest.mark.parametrize(
    ("case", "sig"),
    [
        Case(
            "sigterm-during-report",
            "SIGTERM while the MLflow runs are open",
            "the process ends them FAILED itself, none RUNNING",
            "earlier runs",
        ).param(signal.SIGTERM),
        Case(
            "kill-9-during-report",
            "SIGKILL while the MLflow run is open",
            "the next report marks it KILLED",
            "earlier runs",
        ).param(signal.SIGKILL),
    ],
)
def test_interrupted_report_never_leaves_a_running_run(case, sig, workspace_copy, tmp_path):
    import mlflow

    # A report with nothing new to register logs each method in milliseconds and may finish
    # before the signal lands. Forgetting the registered versions makes every method log and
    # register its model again (seconds each): the window this case needs.
    uri = f"sqlite:///{workspace_copy / 'mlruns.db'}"
    registry = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    for model in registry.search_registered_models():
        registry.delete_registered_model(model.name)
    earlier = {r.info.run_id for r in _mlflow_runs(workspace_copy)}
    log = tmp_path / "report.log"
    proc = start_stage("report", workspace_copy, log)

    def first_method_started():
        # not just the parent: with methods still to log, the signal cannot land after the end.
        # The svm's own run may already be FINISHED (an unchanged model is not logged again, so
        # it stays open for milliseconds); the parent stays open until every method is logged.
        runs = [r for r in _mlflow_runs(workspace_copy) if r.info.run_id not in earlier]
        parent_open = any(
            r.info.status == "RUNNING" and "mlflow.parentRunId" not in r.data.tags for r in runs
        )
        return parent_open and any(r.info.run_name == "svm" for r in runs)

    wait_for(first_method_started)
    code = signal_and_wait(proc, sig, log)
    if sig == signal.SIGKILL:
        assert "RUNNING" in {r.info.status for r in _mlflow_runs(workspace_copy)}
        done = cli("report", cwd=workspace_copy)
        assert done.returncode == 0, done.stderr
    else:
        # 130 as a rule; 1 when the KeyboardInterrupt hit a lazy import and Python wrapped it
        # (a RuntimeError from __set_name__): the CLI then reports an error. Either way the
        # process itself must have ended its runs, which is what this case is about.
        assert code in (130, 1), log.read_text()[-3000:]
    runs = {r.info.run_id: r for r in _mlflow_runs(workspace_copy)}
    interrupted = {
        k: r
        for k, r in runs.items()
        if k not in earlier and r.data.tags.get("transferlab.pid") == str(proc.pid)
    }
    statuses = {k: r.info.status for k, r in interrupted.items()}
    assert "RUNNING" not in {r.info.status for r in runs.values()}
    (parent,) = (r for r in interrupted.values() if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == ("KILLED" if sig == signal.SIGKILL else "FAILED"), statuses
    # methods logged before the signal stay FINISHED; the one it hit ends like the parent
    assert set(statuses.values()) <= {parent.info.status, "FINISHED"}, statuses
    assert all(runs[k].info.status == "FINISHED" for k in earlier)


def _patch_after_nested_create(monkeypatch, mlflow):
    """The signal lands right after the store created a nested run, before start_run returns
    (the run is unknown to MLflow's stack of active runs)."""
    original = mlflow.MlflowClient.create_run

    def create_run(self, *args, **kwargs):
        run = original(self, *args, **kwargs)
        if "mlflow.parentRunId" in (kwargs.get("tags") or {}):
            raise KeyboardInterrupt("stopped by signal 15")
        return run

    monkeypatch.setattr(mlflow.MlflowClient, "create_run", create_run)


def _patch_before_nested_enter(monkeypatch, mlflow):
    """The signal lands after start_run returned a nested run, before its ``with`` block was
    entered (the run is on top of the stack, so the parent's exit would end it instead)."""
    original = mlflow.start_run

    def start_run(*args, **kwargs):
        run = original(*args, **kwargs)
        if kwargs.get("nested"):
            raise KeyboardInterrupt("stopped by signal 15")
        return run

    monkeypatch.setattr(mlflow, "start_run", start_run)


@pytest.mark.parametrize(
    ("case", "patch"),
    [
        Case(
            "sigterm-after-nested-run-created",
            "SIGTERM right after MLflow created a nested run, before start_run returned",
            "parent and nested run end FAILED",
            "no run RUNNING, no active run left in the process",
        ).param(_patch_after_nested_create),
        Case(
            "sigterm-before-nested-run-entered",
            "SIGTERM after start_run returned a nested run, before its with block",
            "parent and nested run end FAILED",
            "no run RUNNING, no active run left in the process",
        ).param(_patch_before_nested_enter),
    ],
)
def test_signal_between_creating_and_entering_a_run(
    case, patch, tiny_dataset, tmp_path_factory, monkeypatch
):
    import mlflow

    from transferlab.config import load_params
    from transferlab.tracking import MethodRecord, log_pipeline_run

    # one store for both cases (creating its schema takes seconds), an experiment each
    ws = tmp_path_factory.getbasetemp() / "race_ws"
    ws.mkdir(exist_ok=True)
    own = ws / f"{case.id}.yaml"
    own.write_text(yaml.safe_dump(tiny_params(tiny_dataset, tracking={"experiment": case.id})))
    params = load_params(own)
    earlier = {r.info.run_id for r in _mlflow_runs(ws, case.id)}
    patch(monkeypatch, mlflow)
    try:
        with pytest.raises(KeyboardInterrupt):
            log_pipeline_run(
                params,
                ws,
                tags={},
                methods=[MethodRecord("svm", metrics={"test_acc": 1.0})],
                artifacts=[],
            )
        monkeypatch.undo()
        left_active = mlflow.active_run()
    finally:
        # a run left on MLflow's stack would break every later test of this process
        mlflow.tracking.fluent._active_run_stack.get().clear()
    assert left_active is None
    statuses = {
        "parent" if "mlflow.parentRunId" not in r.data.tags else r.info.run_name: r.info.status
        for r in _mlflow_runs(ws, case.id)
        if r.info.run_id not in earlier
    }
    assert statuses == {"parent": "FAILED", "svm": "FAILED"}


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "two-runs-one-workspace",
            "a second stage while one runs in the same folder",
            "the second exits 1 naming the holder",
            "the first run and its outputs",
        ).param()
    ],
)
def test_second_run_in_the_same_workspace_is_refused(case, workspace_copy, tmp_path):
    log = tmp_path / "first.log"
    first = start_stage("attack", workspace_copy, log)
    wait_for(
        lambda: (workspace_copy / ".transferlab/lock").exists() and "attack" in log.read_text()
    )
    second = cli("svm", cwd=workspace_copy)
    assert first.wait(timeout=300) == 0
    assert second.returncode == 1
    (line,) = error_lines(second.stderr)
    assert "another transferlab run" in line and "pid" in line


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "two-runs-one-cache",
            "two workspaces fill one shared cache at once",
            "both finish with identical features",
            "every shard loads",
        ).param()
    ],
)
def test_two_workspaces_share_one_cache(case, pipeline_workspace, tmp_path):
    cache = tmp_path / "shared-cache"
    procs, spaces = [], []
    for name in ("a", "b"):
        ws = tmp_path / name
        shutil.copytree(pipeline_workspace, ws, ignore=shutil.ignore_patterns("lock", "cache"))
        params = yaml.safe_load((ws / "params.yaml").read_text())
        params["features"]["cache_dir"] = str(cache)
        (ws / "params.yaml").write_text(yaml.safe_dump(params))
        (ws / "features/features.npz").unlink()
        spaces.append(ws)
        procs.append(start_stage("features", ws, tmp_path / f"{name}.log"))
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    np.testing.assert_array_equal(_features(spaces[0]), _features(spaces[1]))
    assert _shards_load(cache) >= 1


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "parallel-mlflow-sqlite",
            "4 processes log to one SQLite store at once",
            "all 4 runs land, no 'database is locked'",
            "the store",
        ).param()
    ],
)
def test_parallel_logging_to_sqlite(case, tmp_path):
    code = (
        "import mlflow, sys\n"
        "mlflow.set_tracking_uri(sys.argv[1])\n"
        "mlflow.set_experiment('parallel')\n"
        "with mlflow.start_run():\n"
        "    for i in range(20):\n"
        "        mlflow.log_metric('m', i, step=i)\n"
    )
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    # create the schema once: concurrent first-time migrations are not what users hit
    subprocess.run([sys.executable, "-c", code, uri], check=True, capture_output=True)
    procs = [
        subprocess.Popen([sys.executable, "-c", code, uri], stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    assert not any("database is locked" in e for e in errors)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "mlflow-unreachable",
            "MLFLOW_TRACKING_URI points at a dead server",
            "fails in seconds, before any work, saying what to do",
            "no data/ written",
        ).param()
    ],
)
def test_unreachable_tracking_server_fails_fast(case, tiny_dataset, tmp_path):
    ws = write_workspace(tmp_path / "ws", tiny_params(tiny_dataset))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_free_port()}"}
    start = time.monotonic()
    proc = cli("run", cwd=ws, env=env, timeout=120)
    assert proc.returncode == 1
    (line,) = error_lines(proc.stderr)
    assert "unreachable" in line and "MLFLOW_TRACKING_URI" in line
    assert not (ws / "data").exists()
    assert time.monotonic() - start < 60


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "disk-full-features",
            "the cache disk fills up mid-write",
            "a clear 'no space left' error naming the file",
            "existing shards, no temp file",
        ).param()
    ],
)
def test_disk_full_while_writing_features(case, workspace_copy, tmp_path):
    from transferlab.backbones import load_backbone
    from transferlab.data import read_manifest
    from transferlab.features import extract_features

    mount = tmp_path / "small-disk"
    mount.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        pytest.fail("could not mount a small tmpfs (the suite runs as root in CI)")
    try:
        rows = read_manifest(workspace_copy / "data/manifest.csv")
        paths = [workspace_copy / "data" / r["path"] for r in rows]
        shas = [r["sha256"] for r in rows]
        backbone = load_backbone("efficientnet_lite0", "package")
        # a first, small shard fits; the next one does not
        extract_features(backbone, paths[:2], shas[:2], cache_root=mount)
        before = tree_digest(mount)
        with pytest.raises(OSError, match="No space left") as info:
            extract_features(backbone, paths, shas, cache_root=mount)
        assert str(mount) in str(info.value)
        assert tree_digest(mount) == before
        assert leftovers(mount) == [] and not list(mount.rglob(".*tmp"))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory, tiny_dataset):
    """A whole pipeline run with secrets in the environment (and the same params as the
    shared workspace, for the determinism check)."""
    from transferlab.config import load_params
    from transferlab.stages import STAGES

    secrets = {
        "AWS_ACCESS_KEY_ID": "AKIATRANSFERLABTEST1",
        "AWS_SECRET_ACCESS_KEY": "tl-secret-6f1c2b9e8d7a",
        "MLFLOW_TRACKING_TOKEN": "tl-token-3e4d5c6b7a89",
    }
    ws = write_workspace(tmp_path_factory.mktemp("secret_ws"), tiny_params(tiny_dataset))
    saved = {k: os.environ.get(k) for k in secrets}
    os.environ.update(secrets)
    try:
        params = load_params(ws / "params.yaml")
        for stage in STAGES.values():
            stage.run(params, ws)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ws, secrets


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "secrets-never-logged",
            "S3 keys and a tracking token in the environment",
            "not in any output, MLflow param/tag or artifact",
            "-",
        ).param()
    ],
)
def test_secrets_never_reach_outputs(case, secret_run):
    ws, secrets = secret_run
    for path in ws.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            for value in secrets.values():
                assert value.encode() not in blob, f"{value} leaked into {path}"


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "determinism",
            "the same params and seed, run twice",
            "the same split, SVM, FGSM adversarials and metrics",
            "-",
        ).param()
    ],
)
def test_same_params_same_results(case, secret_run, pipeline_workspace):
    from transferlab.attacks import make_attack
    from transferlab.classifiers import load_classifier

    ws, _ = secret_run
    for rel in ("data/manifest.csv", "data/split.csv", "metrics/attack.json"):
        assert (ws / rel).read_bytes() == (pipeline_workspace / rel).read_bytes(), rel
    a, b = (json.loads((w / "metrics/svm.json").read_text()) for w in (ws, pipeline_workspace))
    for d in (a, b):  # wall times differ between runs
        for key in [k for k in d if k.endswith("_seconds")]:
            d.pop(key)
    assert a == b
    m1, m2 = (load_classifier(w / "models/svm") for w in (ws, pipeline_workspace))
    for t1, t2 in zip(m1.head.state_dict().values(), m2.head.state_dict().values(), strict=True):
        assert torch.equal(t1, t2)
    x = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0])
    fgsm = make_attack("fgsm", eps=4 / 255)
    assert torch.equal(fgsm(m1, x, y).x_adv, fgsm(m2, x, y).x_adv)
