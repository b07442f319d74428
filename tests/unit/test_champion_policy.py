"""The tracking model: every run is logged and tagged with what started it, but only the
deployment's gate or a person's `transferlab gate` moves @champion; a model whose weights did not
change is not registered again."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import tiny_params, write_workspace
from transferlab import stages
from transferlab.config import load_params
from transferlab.gate import eps_key
from transferlab.tracking import MethodRecord, log_pipeline_run


class Tiny(torch.nn.Module):
    def __init__(self, weight: float):
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)
        torch.nn.init.constant_(self.fc.weight, weight)
        torch.nn.init.zeros_(self.fc.bias)
        self.classes = ["a", "b"]

    def forward(self, x):
        return self.fc(x)


@pytest.fixture
def ws(tmp_path, tiny_dataset, monkeypatch):
    for var in ("DVC_EXP_NAME", "DVC_STAGE", "DVC_ROOT"):
        monkeypatch.delenv(var, raising=False)
    folder = write_workspace(tmp_path / "ws", tiny_params(tiny_dataset, attack={"models": ["svm"]}))
    (folder / "metrics").mkdir()
    (folder / "reports").mkdir()
    return folder


def pipeline_run(ws, weight: float, monkeypatch, **env) -> dict:
    """What the report stage does for one method, then the files the gate reads."""
    for var in ("DVC_EXP_NAME", "DVC_STAGE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    params = load_params(ws / "params.yaml")
    model = Tiny(weight)
    folder = ws / "models" / f"svm-{weight:g}"  # what the report logs as the MLflow model
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "weights.pt")
    rec = MethodRecord(
        "svm",
        metrics={"test_acc": 0.9},
        model=model,
        model_dir=folder,
        registered_name="tiny-svm",
    )
    ids = log_pipeline_run(params, ws, tags={}, methods=[rec], artifacts=[])
    (ws / "reports/results.json").write_text(json.dumps({"mlflow": ids}))
    summary = {"svm": {"clean_acc": 0.9, "fgsm": {eps_key(params.gate.eps): 0.8}}}
    (ws / "metrics/attack.json").write_text(json.dumps({"summary": summary}))
    return ids


def client(ws):
    import mlflow

    uri = f"sqlite:///{ws / 'mlruns.db'}"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def champion(ws) -> str:
    return str(client(ws).get_model_version_by_alias("tiny-svm", "champion").version)


def test_only_the_deployment_or_an_explicit_gate_moves_the_champion(ws, monkeypatch):
    params = load_params(ws / "params.yaml")
    pipeline_run(ws, 1.0, monkeypatch)
    stages.gate(params, ws)  # a person typed `transferlab gate`
    assert champion(ws) == "1"

    # `dvc exp run -S ...`: new weights, a new version, a passing gate, and still champion v1
    ids = pipeline_run(ws, 2.0, monkeypatch, DVC_EXP_NAME="exp-tiny", DVC_STAGE="report")
    assert ids["model_version.svm"] == "2"
    monkeypatch.setenv("DVC_STAGE", "gate")
    assert stages.gate(params, ws) == {"svm": "promote"}
    decision = json.loads((ws / "reports/gate.json").read_text())["svm"]
    assert decision["alias_moved"] is False and decision["champion_after"] == "1"
    assert champion(ws) == "1"
    parent = client(ws).get_run(ids["parent"])
    assert parent.data.tags["transferlab.run_kind"] == "dvc-experiment"
    assert parent.data.tags["dvc.experiment"] == "exp-tiny"
    assert parent.info.run_name.startswith("exp exp-tiny: svm · efficientnet_lite0 · data ")

    # an ad-hoc Prefect run (`transferlab run`): its gate records, but does not promote
    monkeypatch.delenv("DVC_STAGE")
    monkeypatch.delenv("DVC_EXP_NAME")
    stages.gate(params, ws, context={"prefect.flow_run_id": "f"})
    assert champion(ws) == "1"

    # the scheduled deployment's run promotes
    stages.gate(params, ws, context={"prefect.flow_run_id": "f", "prefect.deployment_id": "d"})
    assert champion(ws) == "2"


def test_unchanged_weights_are_not_registered_again(ws, monkeypatch):
    first = pipeline_run(ws, 1.0, monkeypatch)
    again = pipeline_run(ws, 1.0, monkeypatch)
    versions = client(ws).search_model_versions("name='tiny-svm'")
    assert [str(v.version) for v in versions] == ["1"]
    assert again["model_version.svm"] == first["model_version.svm"] == "1"
    run = client(ws).get_run(again["svm"])
    assert run.data.tags["model.version"] == "1"
    assert run.data.tags["model.uri"] == "models:/tiny-svm/1"
    assert (
        run.data.tags["model.digest"]
        == client(ws).get_model_version("tiny-svm", "1").tags["model.digest"]
    )
    assert not client(ws).list_artifacts(again["svm"], "model")  # no copy of the weights
    parent = client(ws).get_run(again["parent"])
    assert parent.info.run_name.endswith(" · same params")
    assert parent.data.metrics["svm.test_acc"] == 0.9
    changed = pipeline_run(ws, 3.0, monkeypatch)
    assert changed["model_version.svm"] == "2"
