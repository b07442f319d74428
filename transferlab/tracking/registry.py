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
    same = [v for v in versions if v.tags.get(DIGEST_TAG) == digest]
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


@scoped_tracking
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


@scoped_tracking
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
