"""The one package that talks to MLflow, one module per job.

Stages hand over plain records at their boundary; these modules turn them into runs:

- ``store``: where the store is (URI, experiment, a scope pointing MLflow there, fail-fast check).
- ``runs``: run lifecycle (a run per logging call that always ends; orphans closed; series).
- ``pipeline``: the pipeline run, a nested run and model per method, with the lineage tags.
- ``learning_curve`` and ``attack_eval``: the runs of the two side experiments.
- ``experiment_run``: the shape a side experiment's run takes (parent run, nested run per arm),
  which ``learning_curve`` and ``active_learning`` fill.
- ``registry``: registering, naming, loading a model version, and its lineage.
- ``gate``: judging a version and moving the champion alias.
- ``queries``: reading runs back (``transferlab runs``) and serving them (``transferlab ui``).

The names below are the public API; import them from ``transferlab.tracking``.
"""

from transferlab.tracking.attack_eval import log_attack_eval
from transferlab.tracking.gate import apply_gate, champion_of
from transferlab.tracking.learning_curve import log_learning_curve
from transferlab.tracking.pipeline import MODEL_REQUIREMENTS, MethodRecord, log_pipeline_run
from transferlab.tracking.queries import (
    UI_ENV,
    comparison_url,
    experiment_url,
    recent_runs,
    ui_command,
)
from transferlab.tracking.registry import (
    CANDIDATE_ALIAS,
    LINEAGE_TAGS,
    get_model_version,
    load_registered_model,
    model_lineage,
    parse_model_spec,
    register_candidate,
    registered_name,
)
from transferlab.tracking.runs import INVOCATION_TAG, close_orphaned_runs, log_series
from transferlab.tracking.store import (
    TrackingUnavailable,
    check_tracking_store,
    git_state,
    tracking_uri,
)

__all__ = [
    "CANDIDATE_ALIAS",
    "INVOCATION_TAG",
    "LINEAGE_TAGS",
    "MODEL_REQUIREMENTS",
    "MethodRecord",
    "TrackingUnavailable",
    "UI_ENV",
    "apply_gate",
    "champion_of",
    "check_tracking_store",
    "close_orphaned_runs",
    "comparison_url",
    "experiment_url",
    "get_model_version",
    "git_state",
    "load_registered_model",
    "log_attack_eval",
    "log_learning_curve",
    "log_pipeline_run",
    "log_series",
    "model_lineage",
    "parse_model_spec",
    "recent_runs",
    "register_candidate",
    "registered_name",
    "tracking_uri",
    "ui_command",
]
