"""The deployed pipeline against real servers on 127.0.0.1, one of each for the whole module:
a Prefect server (SQLite) with a process worker, an MLflow server (SQLite backend) whose artifacts
go to an S3 endpoint (moto_server). The nightly-retrain deployment runs the tiny dataset once;
the tests then query what it left in Prefect, MLflow and S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REPO, tiny_params, write_workspace
from tests.integration.servers import Server, free_port
from transferlab.methods import METHODS
from transferlab.stages import STAGES

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUCKET = "transferlab"
EXPERIMENT = "tiny-deployed"
MODEL = f"{EXPERIMENT}-svm"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# The nightly run's gate must refuse (a robust-accuracy floor of 1.0 at 8/255: the tiny svm is
# perfect on clean images, so a clean floor could not fail); a re-run of the gate with these
# thresholds must promote.
FAILING_GATE = {"attack": "fgsm", "eps": "8/255", "min_robust_acc": 1.0, "max_drop": 0.0}
PASSING_GATE = {"attack": "fgsm", "eps": "8/255", "min_clean_acc": 0.5, "min_robust_acc": 0.0}


def run_cli(args: list[str], *, env: dict, cwd: Path, timeout: float = 300) -> str:
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """moto S3, MLflow server on it, Prefect server, bootstrap (pool, limit, deploy), worker."""
    tmp = tmp_path_factory.mktemp("stack")
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))
    }
    base.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        PYTHONPATH=str(REPO),
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        PREFECT_HOME=str(tmp / "prefect_home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DVC_NO_ANALYTICS="1",
    )
    servers: list[Server] = []
    try:
        s3_port, ml_port, pf_port = free_port(), free_port(), free_port()
        s3_url = f"http://127.0.0.1:{s3_port}"
        moto = Server(
            "moto",
            ["moto_server", "-H", "127.0.0.1", "-p", str(s3_port)],
            env=base,
            log_dir=tmp,
            cwd=tmp,
        )
        servers.append(moto)
        pf_env = {
            **base,
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp / 'prefect.db'}",
            "PREFECT_SERVER_UI_ENABLED": "false",
        }
        prefect = Server(
            "prefect-server",
            ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(pf_port)],
            env=pf_env,
            log_dir=tmp,
            cwd=tmp,
        )
        servers.append(prefect)
        moto.wait_http(s3_url)
        import boto3

        boto3.client(
            "s3",
            endpoint_url=s3_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket=BUCKET)
        ml_env = {
            **base,
            "MLFLOW_S3_ENDPOINT_URL": s3_url,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        mlflow_server = Server(
            "mlflow-server",
            [
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(ml_port),
                "--backend-store-uri",
                f"sqlite:///{tmp / 'mlflow.db'}",
                "--artifacts-destination",
                f"s3://{BUCKET}/mlartifacts",
                "--workers",
                "1",
            ],
            env=ml_env,
            log_dir=tmp,
            cwd=tmp,
        )
        servers.append(mlflow_server)
        api = f"http://127.0.0.1:{pf_port}/api"
        prefect.wait_http(f"{api}/health", timeout=120)
        mlflow_server.wait_http(f"http://127.0.0.1:{ml_port}/health", timeout=120)
        client_env = {
            **base,
            "PREFECT_API_URL": api,
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ml_port}",
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        }
        run_cli(["bash", "infra/bootstrap.sh"], env=client_env, cwd=REPO, timeout=300)
        worker = Server(
            "prefect-worker",
            ["prefect", "worker", "start", "--pool", "local-process", "--limit", "1"],
            env=client_env,
            log_dir=tmp,
            cwd=REPO,
        )
        servers.append(worker)
        yield {"api": api, "env": client_env, "s3_url": s3_url, "tmp": tmp, "servers": servers}
    finally:
        for server in reversed(servers):
            server.stop()


def _deployment(api: str, name: str) -> dict:
    resp = httpx.get(f"{api}/deployments/name/{name}", timeout=10)
    resp.raise_for_status()
    return resp.json()


def run_deployment(
    stack: dict, name: str, parameters: dict, *, env: dict | None = None, timeout: float = 600
) -> dict:
    """Create a flow run of a deployment through the REST API and wait for a terminal state.

    ``env`` goes in as the process job's ``env`` job variable (what the worker starts it with).
    """
    api = stack["api"]
    dep = _deployment(api, name)
    resp = httpx.post(
        f"{api}/deployments/{dep['id']}/create_flow_run",
        json={"parameters": parameters, "job_variables": {"env": env or {}}},
        timeout=10,
    )
    resp.raise_for_status()
    run_id = resp.json()["id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()
        if run["state"]["type"] in TERMINAL:
            return run
        time.sleep(2)
    worker = next(s for s in stack["servers"] if s.name == "prefect-worker")
    raise TimeoutError(f"{name} run {run_id} not finished after {timeout}s:\n{worker.tail()}")


def task_runs(api: str, flow_run_id: str) -> dict[str, dict]:
    """A flow run's task runs by stage name."""
    runs = httpx.post(
        f"{api}/task_runs/filter",
        json={"flow_runs": {"id": {"any_": [flow_run_id]}}},
        timeout=10,
    ).json()
    by_stage = {}
    for r in runs:  # the stage tasks; attack batches and other helpers carry no stage tag
        stage = next((t for t in r["tags"] if t.startswith("stage:")), None)
        if stage:
            by_stage[stage.removeprefix("stage:")] = r
    return by_stage


@pytest.fixture(scope="module")
def nightly(stack, tmp_path_factory, tiny_dataset):
    """nightly-retrain on the tiny dataset, twice: first with the tracking server down (the run
    fails at report), then with it up (the run resumes: completed stages come from the cache)."""
    params = tiny_params(
        tiny_dataset,
        attack={"eps": ["0", "2/255", "8/255"], "max_images": 6},
        tracking={"experiment": EXPERIMENT},
        gate=FAILING_GATE,
    )
    ws = write_workspace(tmp_path_factory.mktemp("nightly_ws"), params)
    parameters = {"params_path": str(ws / "params.yaml"), "workdir": str(ws)}
    worker = next(s for s in stack["servers"] if s.name == "prefect-worker")
    # A server that answers the flow's up-front /health check but is not MLflow (the Prefect
    # API): the run gets past the check and fails where the tracking calls are, at report.
    down = {
        "MLFLOW_TRACKING_URI": stack["api"],
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    }
    failed = run_deployment(stack, "transferlab-pipeline/nightly-retrain", parameters, env=down)
    assert failed["state"]["type"] == "FAILED", worker.tail()
    run = run_deployment(stack, "transferlab-pipeline/nightly-retrain", parameters)
    assert run["state"]["type"] == "COMPLETED", worker.tail()
    return {"failed": failed, "run": run, "ws": ws}


@pytest.fixture(scope="module")
def mlflow_client(stack):
    import mlflow

    uri = stack["env"]["MLFLOW_TRACKING_URI"]
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def promoted(stack, nightly):
    """The gate re-run with passing thresholds (what tomorrow's nightly would do)."""
    ws = nightly["ws"]
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["gate"] = PASSING_GATE
    (ws / "params_pass.yaml").write_text(yaml.safe_dump(params))
    run_cli(["transferlab", "gate", "-q", "-p", "params_pass.yaml"], env=stack["env"], cwd=ws)
    return json.loads((ws / "reports/gate.json").read_text())


def test_nightly_deployment_is_scheduled_and_completes(stack, nightly):
    dep = _deployment(stack["api"], "transferlab-pipeline/nightly-retrain")
    crons = [s["schedule"].get("cron") for s in dep["schedules"] if s["active"]]
    assert crons == ["0 2 * * *"]
    assert dep["work_pool_name"] == "local-process"
    assert nightly["run"]["state"]["type"] == "COMPLETED"
    assert _deployment(stack["api"], "transferlab-attack-eval/attack-eval")["id"]


def test_heavy_stages_are_tagged_and_limited(stack, nightly):
    api = stack["api"]
    limits = httpx.post(f"{api}/concurrency_limits/filter", json={}, timeout=10).json()
    assert {(c["tag"], c["concurrency_limit"]) for c in limits} >= {("heavy", 1)}
    tasks = task_runs(api, nightly["run"]["id"])
    assert set(tasks) == set(STAGES)
    tags = {stage: set(t["tags"]) for stage, t in tasks.items()}
    assert "heavy" in tags["features"] and "heavy" in tags["attack"]
    assert "heavy" not in tags["report"] and "network" in tags["report"]
    assert {t["state"]["type"] for t in tasks.values()} == {"COMPLETED"}


def test_a_failed_run_retries_then_resumes_from_completed_stages(stack, nightly):
    api = stack["api"]
    failed = task_runs(api, nightly["failed"]["id"])
    assert failed["report"]["state"]["type"] == "FAILED"
    assert failed["report"]["run_count"] == 3  # two retries with backoff, then give up
    assert "gate" not in failed
    upstream = ("pull", "split", "features", "svm", "attack")
    assert {failed[s]["state"]["name"] for s in upstream} == {"Completed"}
    resumed = task_runs(api, nightly["run"]["id"])
    assert {resumed[s]["state"]["name"] for s in upstream} == {"Cached"}
    assert resumed["report"]["state"]["name"] == "Completed"
    assert resumed["gate"]["state"]["name"] == "Completed"


def test_runs_carry_metrics_model_and_every_lineage_tag(mlflow_client, nightly):
    exp = mlflow_client.get_experiment_by_name(EXPERIMENT)
    runs = {
        r.data.tags.get("transferlab.run_type") or r.info.run_name: r
        for r in mlflow_client.search_runs([exp.experiment_id])
    }
    assert set(runs) == {"pipeline", *METHODS}  # one nested run per registered method
    assert {r.data.tags["transferlab.run_kind"] for r in runs.values()} == {"deployment"}
    svm = runs["svm"]
    assert 0.5 <= svm.data.metrics["test_acc"] <= 1.0
    assert "robust_acc_fgsm_eps_2" in svm.data.metrics
    flow_run_id = nightly["run"]["id"]
    for run in runs.values():
        tags = run.data.tags
        for key in (
            "git.commit",
            "git.dirty",
            "params.hash",
            "data.manifest_hash",
            "data.dvc_hash",
            "prefect.flow_run_id",
            "prefect.flow_run_url",
        ):
            assert tags.get(key), (run.info.run_name, key)
        assert tags["prefect.flow_run_id"] == flow_run_id
        assert flow_run_id in tags["prefect.flow_run_url"]
        assert tags["data.dvc_hash"].endswith(".dir")
    versions = mlflow_client.search_model_versions(f"name='{MODEL}'")
    assert [v.run_id for v in versions] == [svm.info.run_id]


def test_a_model_failing_the_gate_is_not_promoted(mlflow_client, nightly):
    from mlflow.exceptions import MlflowException

    gate = json.loads((nightly["ws"] / "reports/gate.json").read_text())["svm"]
    assert gate["robust_acc"] < 1.0  # precondition: the floor of 1.0 really is missed
    assert gate["decision"] == "keep"
    assert gate["reasons"][0].startswith("robust_acc")
    model = mlflow_client.get_registered_model(MODEL)
    assert model.aliases == {"candidate": "1"}
    with pytest.raises(MlflowException):
        mlflow_client.get_model_version_by_alias(MODEL, "champion")
    mv = mlflow_client.get_model_version(MODEL, "1")
    assert mv.tags["gate.decision"] == "keep"
    assert mlflow_client.get_run(mv.run_id).data.tags["gate.decision"] == "keep"


def test_a_model_passing_the_gate_becomes_champion(mlflow_client, promoted):
    assert promoted["svm"]["decision"] == "promote"
    mv = mlflow_client.get_model_version_by_alias(MODEL, "champion")
    assert mv.version == "1"
    assert mv.tags["gate.decision"] == "promote"
    run = mlflow_client.get_run(mv.run_id)
    assert run.data.tags["gate.decision"] == "promote"
    artifacts = [f.path for f in mlflow_client.list_artifacts(mv.run_id, "gate")]
    assert artifacts == ["gate/svm.json"]


def test_lineage_of_the_champion(stack, nightly, promoted, mlflow_client):
    out = run_cli(
        ["transferlab", "lineage", f"{MODEL}@champion", "--json"],
        env=stack["env"],
        cwd=nightly["ws"],
    )
    info = json.loads(out)
    run = mlflow_client.get_run(info["model"]["run_id"])
    assert info["model"]["aliases"] == ["candidate", "champion"]
    assert info["data"]["data.manifest_hash"] == run.data.tags["data.manifest_hash"]
    assert info["data"]["data.dvc_hash"].endswith(".dir")
    assert info["code"]["git.commit"] == run.data.tags["git.commit"]
    assert info["pipeline"]["prefect.flow_run_id"] == nightly["run"]["id"]
    assert info["params"]["svm.cv"] == "2"
    text = run_cli(["transferlab", "lineage", f"{MODEL}/1"], env=stack["env"], cwd=nightly["ws"])
    assert run.data.tags["git.commit"] in text and "data.manifest_hash" in text


def test_attack_eval_deployment_attacks_the_champion(stack, nightly, promoted, mlflow_client):
    ws = nightly["ws"]
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["attack"]["eps"] = ["2/255"]  # one eps is enough to compare, and a third of the time
    (ws / "params_eval.yaml").write_text(yaml.safe_dump(params))
    run = run_deployment(
        stack,
        "transferlab-attack-eval/attack-eval",
        {
            "model": f"{MODEL}@champion",
            "params_path": str(ws / "params_eval.yaml"),
            "workdir": str(ws),
        },
    )
    worker = next(s for s in stack["servers"] if s.name == "prefect-worker")
    assert run["state"]["type"] == "COMPLETED", worker.tail()
    exp = mlflow_client.get_experiment_by_name(EXPERIMENT)
    evals = mlflow_client.search_runs(
        [exp.experiment_id], filter_string="tags.`eval.model` = '" + MODEL + "'"
    )
    assert len(evals) == 1
    metrics = evals[0].data.metrics
    svm = json.loads((ws / "metrics/attack.json").read_text())["summary"]["svm"]
    # the registered model is the one the pipeline attacked: same images, same accuracies
    assert metrics["clean_acc"] == pytest.approx(svm["clean_acc"])
    assert metrics["robust_acc_fgsm_eps_2"] == pytest.approx(svm["fgsm"]["eps_2/255"])


def test_artifacts_live_in_s3(stack, nightly, promoted, mlflow_client):
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=stack["s3_url"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for o in page.get("Contents", [])
    ]
    assert any(k.endswith("robustness.png") for k in keys), keys[:20]
    assert any(k.endswith("MLmodel") for k in keys), keys[:20]
    assert any(k.endswith("gate/svm.json") for k in keys), keys[:20]
    # every run's artifacts are in the bucket; nothing is asserted about the repository's own
    # folders, which `make run` fills (tests must pass before and after it)
    exp = mlflow_client.get_experiment_by_name(EXPERIMENT)
    # direct s3:// or proxied through the server (mlflow-artifacts:/), which stores in the bucket
    stored = (f"s3://{BUCKET}/", "mlflow-artifacts:/")
    assert exp.artifact_location.startswith(stored)
    runs = mlflow_client.search_runs([exp.experiment_id])
    assert runs and all(r.info.artifact_uri.startswith(stored) for r in runs)
    assert not (stack["tmp"] / "mlruns").exists()
