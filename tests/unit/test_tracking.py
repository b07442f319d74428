import os

import pytest


@pytest.mark.slow
def test_logging_a_run_does_not_redirect_later_runs(pipeline_workspace):
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; a library call must not leave it set,
    # or the next workspace's run (and every subprocess) would log into this one's store
    assert "MLFLOW_TRACKING_URI" not in os.environ
