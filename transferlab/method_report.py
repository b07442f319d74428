"""What the report stage logs for each adaptation method: a :class:`MethodRecord` with the final
accuracies, per-class accuracy, per-epoch series, a confusion-matrix plot and the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from transferlab.methods import METHODS  # noqa: F401  (the registry's names, re-exported)
from transferlab.names import metric_key
from transferlab.report import save_figure
from transferlab.tracking import MethodRecord


def plot_confusion(cm: list[list[int]], classes: list[str], out: Path, *, title: str) -> Path:
    """Confusion matrix (rows: true class, columns: predicted) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arr = np.asarray(cm)
    size = 2.5 + 0.45 * len(classes)
    fig, ax = plt.subplots(figsize=(size, size), dpi=110)
    ax.imshow(arr, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            ax.text(j, i, str(arr[i, j]), ha="center", va="center", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, out)


def method_record(
    name: str,
    metrics: dict,
    model,
    *,
    metrics_file: Path,
    confusion_png: Path,
    experiment: str,
) -> MethodRecord:
    """A nested-run record: scalars, per-class accuracy, per-epoch series, confusion plot.

    Args:
        metrics: the method's ``metrics/<name>.json``.
        model: the stored ``Classifier`` (logged as its state dicts, see
            tracking/model_format.py, and registered as ``<experiment>-<name>`` with alias
            ``candidate``).
    """
    size = model.backbone.spec.input_size
    scalars = {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and v is not None
    }
    # the fair protocol's record: the under-trained check, the trials and the choice on val
    sanity = metrics.get("sanity") or {}
    if "under_trained" in sanity:
        scalars["under_trained"] = float(bool(sanity["under_trained"]))
    selection = metrics.get("selection") or {}
    for trial in selection.get("trials", []):
        keys = {k: v for k, v in trial.items() if not k.endswith("_acc")}
        label = "_".join(f"{k}_{v:g}" for k, v in keys.items())
        for k, v in trial.items():
            if k.endswith("_acc") and v is not None:
                scalars[f"trial_{k}_{label}"] = float(v)
    for cls, acc in (metrics.get("per_class_test_acc") or {}).items():
        if acc is not None:
            # class names come from data: emoji, "'", "&", "(" are not valid MLflow keys
            scalars[metric_key(f"test_acc_class_{cls}")] = acc
    series: dict[str, list[tuple[int, float]]] = {}
    for row in metrics.get("history", []):
        for key, value in row.items():
            if key != "epoch" and isinstance(value, int | float) and value is not None:
                series.setdefault(f"epoch_{key}", []).append((int(row["epoch"]), float(value)))
    plot = plot_confusion(
        metrics["confusion_test"], model.classes, confusion_png, title=f"{name}: test confusion"
    )
    return MethodRecord(
        name=name,
        params={
            f"{name}.trained_on": str(metrics.get("trained_on", "images")),
            **{f"{name}.chosen.{k}": str(v) for k, v in selection.get("chosen", {}).items()},
            **(
                {f"{name}.preprocess": str(metrics["preprocess"]["chosen"])}
                if "preprocess" in metrics
                else {}
            ),
        },
        metrics=scalars,
        series=series,
        model=model,
        input_example=np.zeros((1, 3, size, size), np.float32),
        artifacts=[metrics_file, plot],
        registered_name=f"{experiment}-{name}",
    )
