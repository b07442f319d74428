"""prefect.yaml, infra/compose.yaml, infra/Dockerfile and infra/k8s, checked statically.

Docker and Kubernetes are not available on the development machine, so these parse the files
and check that they refer to each other consistently; the Prefect deployments themselves run
against a real server in tests/integration/test_deployments.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from tests.conftest import REPO

INFRA = REPO / "infra"


def _load_entrypoint(entrypoint: str):
    path, func = entrypoint.split(":")
    spec = importlib.util.spec_from_file_location(f"_ep_{Path(path).stem}", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, func)


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def test_deployments_point_at_flows_that_exist(prefect_yaml):
    from prefect import Flow

    deployments = {d["name"]: d for d in prefect_yaml["deployments"]}
    assert {"nightly-retrain", "attack-eval", "learning-curve"} <= set(deployments)
    for name, dep in deployments.items():
        flow = _load_entrypoint(dep["entrypoint"])
        assert isinstance(flow, Flow), name
        # every default parameter is one the flow accepts
        accepted = set(flow.parameters.properties)
        assert set(dep.get("parameters", {})) <= accepted, (name, accepted)
        assert dep["work_pool"]["name"] == "local-process"
        # a deployment run must not need parameters the deployment does not give
        assert set(flow.parameters.required or []) <= set(dep.get("parameters", {})), name


def test_nightly_is_a_valid_cron_schedule(prefect_yaml):
    from prefect.client.schemas.schedules import CronSchedule

    nightly = next(d for d in prefect_yaml["deployments"] if d["name"] == "nightly-retrain")
    (schedule,) = nightly["schedules"]
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises if invalid
    assert nightly["entrypoint"] == "transferlab_flows/pipeline.py:pipeline"


def test_bootstrap_script_parses_and_sets_the_heavy_limit():
    script = INFRA / "bootstrap.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "prefect concurrency-limit create heavy" in text
    assert "prefect --no-prompt deploy --all" in text


def test_heavy_stages_carry_the_limited_tag():
    from transferlab_flows.tasks.stages import HEAVY_TAG, stage_tags

    assert HEAVY_TAG == "heavy"
    assert "heavy" in stage_tags("features") and "heavy" in stage_tags("attack")
    assert "heavy" not in stage_tags("pull") and "network" in stage_tags("pull")
    assert "network" in stage_tags("report") and "network" in stage_tags("gate")


# ------------------------------------------------------------------ compose


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    return dict(env) if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


def test_compose_has_the_stack_with_pinned_images(compose):
    services = compose["services"]
    assert {"postgres", "minio", "prefect-server", "mlflow", "worker"} <= set(services)
    for name, svc in services.items():
        if "image" in svc and "build" not in svc:
            image = svc["image"]
            assert ":" in image and not image.endswith(":latest"), (name, image)
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            assert src.startswith("./") or src in compose["volumes"], (name, vol)
            if src.startswith("./"):
                assert (INFRA / src).exists(), vol
    assert "minio/minio" in services["minio"]["image"]
    build = services["worker"]["build"]
    assert (INFRA / build["context"] / build["dockerfile"]).resolve() == INFRA / "Dockerfile"


def test_compose_services_reference_each_other(compose):
    services = compose["services"]

    def port_of(name: str) -> int:
        cmd = services[name]["command"]
        return int(re.search(r"--port (\d+)", cmd).group(1))

    worker = _env(services["worker"])
    api = urlparse(worker["PREFECT_API_URL"])
    assert (api.hostname, api.port, api.path) == (
        "prefect-server",
        port_of("prefect-server"),
        "/api",
    )
    ml = urlparse(worker["MLFLOW_TRACKING_URI"])
    assert (ml.hostname, ml.port) == ("mlflow", port_of("mlflow"))
    for name in ("worker", "mlflow"):
        s3 = urlparse(_env(services[name])["MLFLOW_S3_ENDPOINT_URL"])
        assert s3.hostname == "minio" and f"{s3.port}:{s3.port}" in services["minio"]["ports"]
    # both servers use Postgres; the mlflow database is created by the init script
    assert (
        "@postgres:5432/prefect"
        in _env(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]
    )
    assert "@postgres:5432/mlflow" in services["mlflow"]["command"]
    assert "CREATE DATABASE mlflow" in (INFRA / "postgres-init.sql").read_text()
    assert "s3://mlflow/" in services["mlflow"]["command"]
    assert "local/mlflow" in services["minio-init"]["entrypoint"]
    assert _env(services["mlflow"])["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    host_ports = [p.split(":")[0] for s in services.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports))


def test_compose_takes_secrets_from_the_environment(compose):
    for name, svc in compose["services"].items():
        for key, value in _env(svc).items():
            if any(word in key for word in ("PASSWORD", "SECRET")):
                assert str(value).startswith("${"), (name, key)


def test_dockerfile_has_cpu_default_and_cuda_variant():
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM python:", text, re.M)
    assert "ARG VARIANT=cpu" in text and '"$VARIANT" = cpu' in text
    for src in re.findall(r"^COPY (.+) \./", text, re.M):
        for part in src.split():
            assert (REPO / part).exists(), part
    assert "constraints.txt" in text


# ------------------------------------------------------------------ kubernetes


@pytest.fixture(scope="module")
def k8s() -> list[dict]:
    kustom = yaml.safe_load((INFRA / "k8s/kustomization.yaml").read_text())
    docs = []
    for res in kustom["resources"]:
        docs += [d for d in yaml.safe_load_all((INFRA / "k8s" / res).read_text()) if d]
    return docs


def test_k8s_manifests_are_consistent(k8s):
    kinds = {(d["kind"], d["metadata"]["name"]) for d in k8s}
    assert ("Namespace", "transferlab") in kinds
    assert all(d["metadata"].get("namespace", "transferlab") == "transferlab" for d in k8s)
    worker = next(d for d in k8s if d["kind"] == "Deployment")
    spec = worker["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    pod = spec["template"]["spec"]
    assert ("ServiceAccount", pod["serviceAccountName"]) in kinds
    (container,) = pod["containers"]
    assert container["image"].startswith("prefecthq/prefect:3.")
    assert container["command"][:3] == ["prefect", "worker", "start"]
    assert "kubernetes" in container["command"]
    for ref in container["envFrom"]:
        assert ("ConfigMap", ref["configMapRef"]["name"]) in kinds
    binding = next(d for d in k8s if d["kind"] == "RoleBinding")
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    role = next(d for d in k8s if d["kind"] == "Role")
    assert any("jobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"])


def test_base_job_template_placeholders_have_variables(k8s):
    from prefect.utilities.templating import find_placeholders

    template = json.loads((INFRA / "k8s/base-job-template.json").read_text())
    names = {p.name for p in find_placeholders(template["job_configuration"])}
    assert names <= set(template["variables"]["properties"]), names
    job = template["job_configuration"]["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in k8s}
    assert pod["serviceAccountName"] == "{{ service_account_name }}"
    default_sa = template["variables"]["properties"]["service_account_name"]["default"]
    assert ("ServiceAccount", default_sa) in kinds
    pvc = template["variables"]["properties"]["workspace_pvc"]["default"]
    assert ("PersistentVolumeClaim", pvc) in kinds
    env_from = pod["containers"][0]["envFrom"]
    assert ("ConfigMap", env_from[0]["configMapRef"]["name"]) in kinds
