"""The model registry: register a method's model, name a version, read its lineage, load it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transferlab.config import Params
from transferlab.tracking.store import client as _client
from transferlab.tracking.store import scoped_tracking

log = logging.getLogger(__name__)

CANDIDATE_ALIAS = "candidate"
# sha256 of a model's state dict (``pipeline.weights_digest``): a run whose weights equal a
# registered version's points at that version instead of registering a copy.
DIGEST_TAG = "model.digest"
# versions logged as state dicts (tracking/model_format.py); older ones are pickles, which
# transferlab no longer loads, so a run with unchanged weights must not point back at them
FORMAT_TAG = "model.format"
FORMAT = "transferlab-state-dict-1"
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


def find_version(client, name: str, digest: str):
    """The registered version of ``name`` whose weights digest is ``digest``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    same = [
        v for v in versions if v.tags.get(DIGEST_TAG) == digest and v.tags.get(FORMAT_TAG) == FORMAT
    ]
    return max(same, key=lambda v: int(v.version)) if same else None


def point_candidate(client, name: str, version: str) -> None:
    """Move the ``candidate`` alias (the last pipeline run's model) to ``version``."""
    client.set_registered_model_alias(name, CANDIDATE_ALIAS, version)


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


def _classes(mv) -> list[str]:
    return json.loads(mv.tags.get("model.classes") or "[]")


def classes_added(client, mv) -> list[str]:
    """The classes version ``mv`` predicts that the version registered before it did not.

    Its run's ``data.dvc_hash`` is then the data version that added them (``label import
    --new-class``, then ``dvc repro``). The first version of a name added nothing.
    """
    earlier = [
        v
        for v in client.search_model_versions(f"name='{mv.name}'")
        if int(v.version) < int(mv.version)
    ]
    if not earlier:
        return []
    before = set(_classes(max(earlier, key=lambda v: int(v.version))))
    return [c for c in _classes(mv) if c not in before]


@scoped_tracking
def model_lineage(params: Params, workdir: Path, spec: str) -> dict:
    """Data, code and params versions behind a registered model version.

    Returns:
        {"model": {name, version, aliases, run_id, source}, "data": {manifest and DVC hash,
         classes_added}, "code": {...}, "pipeline": {...}, "params": {flattened params}}
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
        # the data version, and the classes it brought that the previous version lacked
        "data": {
            **{k: tags.get(k) for k in ("data.manifest_hash", "data.dvc_hash")},
            "classes_added": classes_added(client, mv),
        },
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


@scoped_tracking
def load_registered_model(params: Params, workdir: Path, spec: str):
    """Load a registered model version (``NAME@alias`` / ``NAME/version``) for attacking.

    Only tensors and JSON are read from the artifact store, by the installed transferlab (see
    tracking/model_format.py): never a pickle, never code.

    Returns:
        (model, ModelVersion); the model maps images in [0, 1], (N, 3, H, W), to logits (N, K),
        is in eval mode and has ``classes``.
    """
    import mlflow

    from transferlab.classifiers import load_classifier

    client = _client(params, workdir)
    mv = get_model_version(client, spec)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{mv.name}/{mv.version}"))
    folder = _classifier_folder(local, f"{mv.name} v{mv.version}")
    model = load_classifier(folder)
    tagged = json.loads(mv.tags.get("model.classes", "null"))
    if tagged is not None and tagged != model.classes:
        raise ValueError(
            f"{folder / 'meta.json'} lists classes {model.classes[:6]}, but {mv.name} "
            f"v{mv.version} was registered with {tagged[:6]}"
        )
    return model.eval(), mv


def _classifier_folder(model_dir: Path, what: str) -> Path:
    """The classifier folder a logged model carries, from its MLmodel file (checked to stay
    inside the download)."""
    import yaml

    from transferlab.tracking.model_format import ARTIFACT

    mlmodel = model_dir / "MLmodel"
    try:
        spec = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))
        rel = spec["flavors"]["python_function"]["artifacts"][ARTIFACT]["path"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        raise ValueError(
            f"{what}: {mlmodel} does not describe a transferlab classifier (models logged "
            "before transferlab stored state dicts were pickles, which it no longer loads: "
            "re-run `transferlab report` to log the model again)"
        ) from None
    folder = (model_dir / rel).resolve()
    if not folder.is_relative_to(model_dir.resolve()) or not (folder / "meta.json").is_file():
        raise ValueError(f"{what}: {mlmodel} points at {rel!r}, not a classifier folder in it")
    return folder
