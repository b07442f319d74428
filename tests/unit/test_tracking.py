import os
from pathlib import Path

import pytest


@pytest.mark.slow
def test_logging_a_run_does_not_redirect_later_runs(pipeline_workspace):
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; a library call must not leave it set,
    # or the next workspace's run (and every subprocess) would log into this one's store
    assert "MLFLOW_TRACKING_URI" not in os.environ


@pytest.mark.slow
def test_logged_model_is_state_dicts_and_loads_with_any_batch(pipeline_workspace):
    import json

    import mlflow
    import numpy as np
    import torch

    from transferlab.config import load_params
    from transferlab.tracking import load_registered_model

    results = json.loads((pipeline_workspace / "reports/results.json").read_text())
    ml = results["mlflow"]
    mlflow.set_tracking_uri(ml["tracking_uri"])
    try:
        local = mlflow.artifacts.download_artifacts(f"runs:/{ml['svm']}/model")
        # users who trust the store: pyfunc (the model is code, not a cloudpickle)
        pyfunc = mlflow.pyfunc.load_model(f"runs:/{ml['svm']}/model")
    finally:
        mlflow.set_tracking_uri(None)
    files = {p.name for p in Path(local).rglob("*") if p.is_file()}
    assert {"head.pt", "meta.json", "MLmodel"} <= files
    assert not files & {"model.pth", "python_model.pkl", "pickle_module_info.txt"}
    assert pyfunc.predict(np.random.rand(3, 3, 224, 224).astype(np.float32)).shape == (3, 3)

    params = load_params(pipeline_workspace / "params.yaml")
    model, mv = load_registered_model(params, pipeline_workspace, "tiny-svm@candidate")
    with torch.inference_mode():
        assert model(torch.rand(5, 3, 224, 224)).shape == (5, 3)
    assert model.classes == json.loads(mv.tags["model.classes"])
