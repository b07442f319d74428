"""Plots and summary tables from the metrics files."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from transferlab.atomic import atomic_write

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_robustness(rows: list[dict], out: Path) -> Path:
    """Robust accuracy against eps (in 1/255 units), one line per model and attack."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    series: dict[str, list[dict]] = {}
    for r in rows:
        series.setdefault(f"{r['model']} / {r['attack']}", []).append(r)
    for label, pts in sorted(series.items()):
        pts = sorted(pts, key=lambda r: r["eps"])
        ax.plot(
            [p["eps"] * 255 for p in pts], [p["robust_acc"] for p in pts], marker="o", label=label
        )
    ax.set_xlabel("eps (x / 255, L-inf, pixel space)")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Robustness under attack")
    fig.tight_layout()
    with atomic_write(out) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return out


def results_table(svm_metrics: dict, attack_rows: list[dict], report_eps: float) -> list[dict]:
    """One row per method: accuracies, and robust accuracy per attack at ``report_eps``."""
    row = {
        "method": "svm",
        "test_acc": svm_metrics["test_acc"],
        "val_acc": svm_metrics.get("val_acc"),
        "train_seconds": svm_metrics["fit_seconds"],
    }
    for r in attack_rows:
        if r["model"] == "svm" and abs(r["eps"] - report_eps) < 1e-9:
            row[f"robust_acc_{r['attack']}"] = r["robust_acc"]
    return [row]
