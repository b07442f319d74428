"""The gate's MLflow side: judge a registered version and move the champion alias if it passes."""

from __future__ import annotations

import logging
from pathlib import Path

from transferlab.config import Params
from transferlab.tracking.registry import registered_name
from transferlab.tracking.store import client as _client
from transferlab.tracking.store import scoped_tracking

log = logging.getLogger(__name__)


def _current_champion(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _champion_metrics(version):
    from transferlab.gate import from_tags

    return from_tags(version.tags)


@scoped_tracking
def champion_of(params: Params, workdir: Path, method: str) -> tuple[str | None, object]:
    """(version, ``transferlab.gate.GateMetrics``) of ``method``'s current champion, or
    (None, None): what the report shows the gate's decision against."""
    client = _client(params, workdir)
    current = _current_champion(client, registered_name(params, method), params.gate.alias)
    if current is None:
        return None, None
    return str(current.version), _champion_metrics(current)


@scoped_tracking
def apply_gate(
    params: Params, workdir: Path, method: str, version: str, candidate, *, move_alias: bool = True
) -> dict:
    """Judge a registered version against the floors and the champion; move the alias if it
    passes and ``move_alias`` (False for experiment and ad-hoc runs: the decision is recorded,
    the champion stays).

    The decision and its reasons go onto the model version and its run as ``gate.*`` tags and a
    ``gate/<method>.json`` artifact, so the MLflow UI shows why a model was (not) promoted.

    Args:
        candidate: the version's ``transferlab.gate.GateMetrics``.

    Returns:
        {"model", "version", "decision", "reasons", "champion_before", "champion_after", ...}
    """
    from transferlab.gate import decide, to_tags

    gp = params.gate
    client = _client(params, workdir)
    name = registered_name(params, method)
    current = _current_champion(client, name, gp.alias)
    champion = None if current is None else _champion_metrics(current)
    decision = decide(candidate, champion, gp)
    record = {
        "model": name,
        "version": str(version),
        "decision": decision.decision,
        "reasons": list(decision.reasons),
        "clean_acc": candidate.clean_acc,
        "robust_acc": candidate.robust_acc,
        "n_images": candidate.n,
        "attack": candidate.attack or gp.attack,
        "eps": gp.eps,
        "alias": gp.alias,
        "champion_before": None if current is None else str(current.version),
        "alias_moved": bool(decision.promote and move_alias),
    }
    tags = {
        "gate.decision": decision.decision,
        "gate.reasons": "; ".join(decision.reasons),
        **to_tags(candidate),
        "gate.attack": gp.attack,
        "gate.eps": f"{gp.eps:.6g}",
        "gate.alias_moved": str(record["alias_moved"]).lower(),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    if record["alias_moved"]:
        client.set_registered_model_alias(name, gp.alias, str(version))
    record["champion_after"] = str(version) if record["alias_moved"] else record["champion_before"]
    run_id = client.get_model_version(name, str(version)).run_id
    if run_id:
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        client.log_dict(run_id, record, f"gate/{method}.json")
    held = decision.promote and not move_alias
    log.info(
        "gate %s v%s: %s (%s)%s",
        name,
        version,
        decision.decision,
        decision.reasons[0],
        f"; not applied: only the deployment or `transferlab gate` moves @{gp.alias}"
        if held
        else "",
    )
    return record
