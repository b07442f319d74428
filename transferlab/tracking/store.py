"""Where the MLflow store is: its URI, the experiment, and a scope that points MLflow there."""

from __future__ import annotations

import functools
import logging
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

from transferlab.config import Params

log = logging.getLogger(__name__)


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


# MLflow 3 opens an experiment on the page its kind asks for; without the tag it guesses, and
# shows the GenAI overview instead of the runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


# (table, column) pairs of MLflow's SQL schema that hold artifact locations
_LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)


def relocate_moved_store(uri: str, workdir: Path, artifact_dir: str) -> int:
    """After the workspace folder moved (or was copied), point its SQLite store at the
    artifacts beside it. Returns how many stored locations were rewritten.

    MLflow stores artifact locations as absolute ``file://`` URIs (a relative one is resolved
    at creation), so a moved workspace would keep logging into the old path, recreating it,
    and its model versions would point at files that are gone. Only a store that lives inside
    ``workdir`` with its artifacts at ``workdir/artifact_dir`` is rewritten: locations equal to
    ``<old root>/<artifact_dir>`` (or below it) become ``<workdir>/<artifact_dir>``. A shared
    store, a server, or artifacts kept elsewhere are left alone.
    """
    import sqlite3

    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return 0
    workdir = workdir.resolve()
    db = Path(uri[len(prefix) :])
    new_root = (workdir / artifact_dir).resolve()
    if not db.is_file() or not db.resolve().is_relative_to(workdir) or not new_root.is_dir():
        return 0
    new = new_root.as_uri()
    tail = "/" + "/".join(Path(artifact_dir).parts)
    con = sqlite3.connect(db, timeout=30)
    try:
        try:
            found = [r[0] for r in con.execute("SELECT artifact_location FROM experiments")]
        except sqlite3.DatabaseError:
            return 0  # not (yet) an MLflow store
        olds = {
            loc
            for loc in found
            if loc and loc.startswith("file:") and loc != new and loc.endswith(tail)
        }
        changed = 0
        with con:
            for old in olds:
                for table, column in _LOCATION_COLUMNS:
                    cols = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
                    if column not in cols:
                        continue
                    n = len(old)
                    changed += con.execute(
                        f"UPDATE {table} SET {column} = :new || substr({column}, :n + 1) "
                        f"WHERE substr({column}, 1, :n) = :old "
                        f"AND (length({column}) = :n OR substr({column}, :n + 1, 1) = '/')",
                        {"new": new, "old": old, "n": n},
                    ).rowcount
        if olds:
            log.warning(
                "the workspace moved: %d MLflow artifact location(s) now point at %s instead of %s",
                changed,
                new,
                ", ".join(sorted(olds)),
            )
        return changed
    finally:
        con.close()


def experiment_id(mlflow, params: Params, workdir: Path, uri: str) -> str:
    """The id of ``params.tracking.experiment``, created (with a local artifact root) if new,
    and tagged as a model-training experiment so the MLflow UI opens it on its runs."""
    relocate_moved_store(uri, workdir, params.tracking.artifact_dir)
    name = params.tracking.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND_TAG) is None:
            mlflow.MlflowClient().set_experiment_tag(
                exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
            )
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        # Without this a SQLite store writes ./mlruns wherever the process happens to run.
        location = (workdir / params.tracking.artifact_dir).resolve().as_uri()
    return mlflow.create_experiment(
        name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    )


@contextmanager
def tracking_to(mlflow, uri: str):
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


def scoped_tracking(fn):
    """Run ``fn(params, workdir, ...)`` with MLflow pointed at that workspace's store, and put
    the user's tracking URI back afterwards (see ``tracking_to``)."""

    @functools.wraps(fn)
    def wrapper(params: Params, workdir: Path, *args, **kwargs):
        import mlflow

        with tracking_to(mlflow, tracking_uri(params, workdir)):
            return fn(params, workdir, *args, **kwargs)

    return wrapper


def client(params: Params, workdir: Path):
    """An MlflowClient on this workspace's tracking and registry store."""
    import mlflow

    uri = tracking_uri(params, workdir)
    relocate_moved_store(uri, workdir, params.tracking.artifact_dir)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


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
