import os

import pytest


@pytest.mark.slow
def test_logging_a_run_does_not_redirect_later_runs(pipeline_workspace):
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; a library call must not leave it set,
    # or the next workspace's run (and every subprocess) would log into this one's store
    assert "MLFLOW_TRACKING_URI" not in os.environ


@pytest.mark.slow
def test_logged_model_loads_and_takes_any_batch(pipeline_workspace):
    import json

    import mlflow
    import torch

    results = json.loads((pipeline_workspace / "reports/results.json").read_text())
    ml = results["mlflow"]
    mlflow.set_tracking_uri(ml["tracking_uri"])
    try:
        model = mlflow.pytorch.load_model(f"runs:/{ml['svm']}/model")
    finally:
        mlflow.set_tracking_uri(None)
    with torch.inference_mode():
        logits = model(torch.rand(3, 3, 224, 224))
    assert logits.shape == (3, 3)
