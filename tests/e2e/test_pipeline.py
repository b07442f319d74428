"""`dvc repro` and the Prefect flow run the same stages on the same params to the same metrics."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_params, write_workspace
from transferlab.methods import METHODS

pytestmark = pytest.mark.slow

COMPARED = ("metrics/svm.json", "metrics/attack.json")


def sh(*args: str, cwd: Path) -> str:
    # eight stages incl. fine-tuning and three logged models: generous for a shared 2-core CPU
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def mlflow_client(workdir: Path):
    import mlflow

    return mlflow.MlflowClient(
        tracking_uri=f"sqlite:///{workdir / 'mlruns.db'}",
        registry_uri=f"sqlite:///{workdir / 'mlruns.db'}",
    )


def mlflow_runs(workdir: Path) -> list:
    client = mlflow_client(workdir)
    exp = client.get_experiment_by_name("tiny")
    return client.search_runs([exp.experiment_id]) if exp else []


def comparable(workdir: Path) -> dict:
    out = {}
    for rel in COMPARED:
        data = json.loads((workdir / rel).read_text())
        for key in [k for k in data if k.endswith("_seconds")]:  # wall time differs per run
            data.pop(key)
        out[rel] = data
    return out


@contextlib.contextmanager
def count_work():
    """Count params parses, attack-model loads (all, and the attack stage's) and feature shards
    while the block runs (Prefect runs the tasks in threads of this process)."""
    import transferlab.robustness
    import transferlab.stages
    from transferlab.config import Params

    work = {"parses": 0, "loads": Counter(), "stage_loads": Counter(), "shards": 0}
    validate = Params.model_validate.__func__
    load = transferlab.robustness.load_attack_model
    shard = transferlab.stages.features_shard
    session_init = transferlab.robustness.AttackSession.__init__

    def counting_validate(cls, *args, **kwargs):
        work["parses"] += 1
        return validate(cls, *args, **kwargs)

    def counting_load(params, root, name):
        work["loads"][name] += 1
        return load(params, root, name)

    def counting_shard(*args, **kwargs):
        work["shards"] += 1
        return shard(*args, **kwargs)

    def counting_session(self, params, root):
        session_init(self, params, root)
        model = self.model

        def counting_model(name):
            if name not in self._models:
                work["stage_loads"][name] += 1
            return model(name)

        self.model = counting_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Params, "model_validate", classmethod(counting_validate))
        mp.setattr(transferlab.robustness, "load_attack_model", counting_load)
        mp.setattr(transferlab.stages, "features_shard", counting_shard)
        mp.setattr(transferlab.robustness.AttackSession, "__init__", counting_session)
        yield work


@pytest.fixture(scope="module")
def dvc_workspace(tmp_path_factory, tiny_dataset) -> Path:
    ws = write_workspace(tmp_path_factory.mktemp("dvc_ws"), tiny_params(tiny_dataset))
    shutil.copy(REPO / "dvc.yaml", ws / "dvc.yaml")
    (ws / "labelled").mkdir()  # pull's dependency (label import's folder), as a clone has it
    sh("git", "init", "-q", cwd=ws)
    sh("dvc", "init", "-q", cwd=ws)
    sh("dvc", "config", "core.analytics", "false", cwd=ws)
    sh("dvc", "config", "core.site_cache_dir", str(ws / ".dvc" / "site_cache"), cwd=ws)
    sh("dvc", "repro", cwd=ws)
    return ws


def test_dvc_repro_produces_metrics_and_a_tracked_run(dvc_workspace):
    ws = dvc_workspace
    svm = json.loads((ws / "metrics/svm.json").read_text())
    assert svm["test_acc"] >= 0.5  # 3 easy classes: far above chance (0.33)
    attack = json.loads((ws / "metrics/attack.json").read_text())
    assert not [f for f in attack["sanity"] if f["level"] == "fail"]
    curve = attack["summary"]["svm"]["fgsm"]
    assert curve["eps_0/255"] == pytest.approx(attack["summary"]["svm"]["clean_acc"])
    assert curve["eps_8/255"] <= curve["eps_0/255"]
    assert (ws / "plots/robustness.png").stat().st_size > 1000
    runs = mlflow_runs(ws)
    names = sorted(r.data.tags.get("transferlab.run_type") or r.info.run_name for r in runs)
    assert names == sorted(["pipeline", *METHODS])  # one nested run per registered method
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.run_name.startswith("+".join(METHODS) + " · ")  # what ran, on what data
    assert parent.data.tags["transferlab.run_kind"] == "dvc-repro"
    assert parent.data.metrics["svm.test_acc"] == pytest.approx(svm["test_acc"])
    child = next(r for r in runs if r.info.run_name == "svm")
    assert child.data.metrics["test_acc"] == pytest.approx(svm["test_acc"])
    assert "robust_acc_fgsm_eps_8" in child.data.metrics
    for tag in ("git.commit", "params.hash", "data.manifest_hash"):
        assert tag in child.data.tags
    for method in ("top", "full"):
        run = next(r for r in runs if r.info.run_name == method)
        metrics = json.loads((ws / f"metrics/{method}.json").read_text())
        assert run.data.metrics["test_acc"] == pytest.approx(metrics["test_acc"])
        assert run.data.metrics["trained_parameters"] == metrics["trained_parameters"]
        assert ("robust_acc_fgsm_eps_8" in run.data.metrics) == (method == "full")
        assert (ws / f"plots/confusion/{method}.png").stat().st_size > 1000
    assert len(mlflow_client(ws).get_metric_history(run.info.run_id, "epoch_train_acc")) == 1
    for method in ("svm", "top", "full"):
        version = mlflow_client(ws).get_model_version_by_alias(f"tiny-{method}", "candidate")
        assert version.run_id == next(r for r in runs if r.info.run_name == method).info.run_id
    # The data version is the hash dvc.lock records for the pulled images.
    from transferlab.data.version import lock_hash

    assert child.data.tags["data.dvc_hash"] == lock_hash(ws)
    assert child.data.tags["data.dvc_hash_source"] == "dvc.lock"


def test_second_dvc_repro_is_a_no_op(dvc_workspace):
    before = {p: p.stat().st_mtime_ns for p in (dvc_workspace / "metrics").iterdir()}
    out = sh("dvc", "repro", cwd=dvc_workspace)
    assert "up to date" in out
    assert "Running stage" not in out
    assert before == {p: p.stat().st_mtime_ns for p in (dvc_workspace / "metrics").iterdir()}
    assert len(mlflow_runs(dvc_workspace)) == len(METHODS) + 1


def test_prefect_flow_gives_the_same_metrics_and_caches(tmp_path, tiny_dataset, dvc_workspace):
    from prefect.testing.utilities import prefect_test_harness

    from transferlab_flows.pipeline import pipeline

    ws = write_workspace(tmp_path / "prefect_ws", tiny_params(tiny_dataset))
    with prefect_test_harness(server_startup_timeout=60):
        with count_work() as work:
            first = pipeline(params_path=str(ws / "params.yaml"), workdir=str(ws))
        # one parse per flow run; every model the attack stage names loaded once there (and
        # once per batch task, which decodes only its batch)
        assert work["parses"] == 1
        assert work["stage_loads"] == {"svm": 1, "full": 1}
        features_mtime = (ws / "features/features.npz").stat().st_mtime_ns
        with count_work() as work:
            second = pipeline(params_path=str(ws / "params.yaml"), workdir=str(ws))
        # all cached: the pre-steps (feature shards, attack batches) are skipped too
        assert work == {"parses": 1, "loads": Counter(), "stage_loads": Counter(), "shards": 0}
    assert comparable(ws) == comparable(dvc_workspace)
    runs = mlflow_runs(ws)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.tags["prefect.flow_run_id"]
    # No dvc.lock here: the same hash, computed the way DVC does, for the same images.
    from transferlab.data.version import lock_hash

    assert parent.data.tags["data.dvc_hash"] == lock_hash(dvc_workspace)
    assert parent.data.tags["data.dvc_hash_source"] == "computed"
    # the second run is served from the result cache: nothing recomputed, nothing re-logged
    assert second == first
    assert (ws / "features/features.npz").stat().st_mtime_ns == features_mtime
    assert len(runs) == len(METHODS) + 1
