"""Plots and summary tables from the metrics files."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from transferlab.atomic import atomic_write
from transferlab.eps import Eps

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_robustness(rows: list[dict], out: Path) -> Path:
    """Robust accuracy against eps (in 1/255 units), one line per model and attack: the colour
    says the model, the line style and marker the attack (twelve lines would run out of the
    colour cycle, and two curves in one colour read as one model)."""
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    series: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        series.setdefault((r["model"], r["attack"]), []).append(r)
    models = list(dict.fromkeys(m for m, _ in series))  # in the rows' order
    attacks = list(dict.fromkeys(a for _, a in series))
    colours = plt.get_cmap("tab10")
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P"]
    for (model, attack), pts in series.items():
        pts = sorted(pts, key=lambda r: r["eps"])
        i, j = models.index(model), attacks.index(attack)
        ax.plot(
            [p["eps"] * 255 for p in pts],
            [p["robust_acc"] for p in pts],
            color=colours(i % 10),
            linestyle=styles[j % len(styles)],
            marker=markers[j % len(markers)],
            label=f"{model} / {attack}",
        )
    ax.set_xlabel("eps (x / 255, L-inf, pixel space)")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    # beside the axes, not on them: inside, it covers the curves it names
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, title="model / attack")
    ax.set_title("Robustness under attack")
    fig.tight_layout()
    return save_figure(fig, out)


def training_regime(n_train: int | None, n_classes: int | None) -> str:
    """The seed's table: the SVM suits a handful to dozens of images per class, a new top
    layer dozens to hundreds, full fine-tuning thousands."""
    if not n_train or not n_classes:
        return "-"
    per_class = n_train / n_classes
    band = "few (< 25)" if per_class < 25 else "dozens-hundreds" if per_class < 1000 else "1000+"
    return f"{per_class:.0f}/class: {band}"


def results_table(
    metrics_by_method: dict[str, dict], attack_rows: list[dict], report_eps: float
) -> list[dict]:
    """The transfer ladder: one row per method with accuracies, robust accuracy per attack at
    ``report_eps``, each with its 95% interval (``*_ci_low``, ``*_ci_high``), training time,
    trained parameters and the training-set regime."""
    table = []
    for method, m in metrics_by_method.items():
        per_class = m.get("per_class_test_acc") or {}
        row = {
            "method": method,
            "test_acc": m.get("test_acc"),
            "test_acc_ci_low": m.get("test_acc_ci_low"),
            "test_acc_ci_high": m.get("test_acc_ci_high"),
            "val_acc": m.get("val_acc"),
            "train_seconds": m.get("train_seconds", m.get("fit_seconds")),
            "trained_params": m.get("trained_parameters"),
            "regime": training_regime(m.get("n_train"), len(per_class) or None),
        }
        for r in attack_rows:
            if r["model"] == method and abs(r["eps"] - report_eps) < 1e-9:
                row[f"robust_acc_{r['attack']}"] = r["robust_acc"]
                for end in ("ci_low", "ci_high"):
                    if f"robust_acc_{end}" in r:
                        row[f"robust_acc_{r['attack']}_{end}"] = r[f"robust_acc_{end}"]
        table.append(row)
    return table


def save_figure(fig, out: Path) -> Path:
    """Save a figure as PNG atomically and close it."""
    with atomic_write(out) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return out


def plot_transfer_matrix(rows: list[dict], out: Path) -> Path:
    """Heatmap of robust accuracy: sources (rows) x targets (columns); the diagonal is white-box.

    Args:
        rows: ``transfer_matrix`` rows (source, target, robust_acc, clean_acc, eps, attack).
    """
    if not rows:
        # no sources configured: a placeholder, so the declared output always exists
        fig, ax = plt.subplots(figsize=(4, 1.5), dpi=120)
        ax.text(0.5, 0.5, "no transfer sources (attack.transfer.sources)", ha="center")
        ax.axis("off")
        return save_figure(fig, out)
    sources = list(dict.fromkeys(r["source"] for r in rows))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    grid = [[float("nan")] * len(targets) for _ in sources]
    for r in rows:
        grid[sources.index(r["source"])][targets.index(r["target"])] = r["robust_acc"]
    fig, ax = plt.subplots(figsize=(2.4 + 1.6 * len(targets), 1.6 + 0.8 * len(sources)), dpi=120)
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=9)
    clean = {r["target"]: r["clean_acc"] for r in rows}
    ax.set_xticks(
        range(len(targets)), [f"{t}\n(clean {clean[t]:.2f})" for t in targets], fontsize=8
    )
    ax.set_yticks(range(len(sources)), sources)
    ax.set_xlabel("target (evaluated)")
    ax.set_ylabel("source (crafted on)")
    if rows:
        ax.set_title(
            f"Transfer robust accuracy\n{rows[0]['attack']}, eps {Eps(rows[0]['eps']).label}",
            fontsize=10,
        )
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return save_figure(fig, out)


def grid_pairs(models: list[str], attacks: list[str], rows: int) -> list[tuple[str, str]]:
    """The (model, attack) rows of the adversarial-example grid: at most ``rows``, chosen so that
    every model and every attack shows up whenever ``rows >= max(len(models), len(attacks))``
    (the model-major prefix of 4 models x 3 attacks in 8 rows would leave out the last model),
    then listed model-major so each model's rows sit together."""
    left = [(m, a) for m in models for a in attacks]
    chosen: list[tuple[str, str]] = []
    seen: set[str] = set()
    while left and len(chosen) < rows:
        # the first pair (model-major) that shows the most models/attacks not yet shown
        pair = max(left, key=lambda p: (f"m:{p[0]}" not in seen) + (f"a:{p[1]}" not in seen))
        left.remove(pair)
        chosen.append(pair)
        seen |= {f"m:{pair[0]}", f"a:{pair[1]}"}
    return sorted(chosen, key=lambda p: (models.index(p[0]), attacks.index(p[1])))


def plot_adversarial_grid(examples: list[dict], out: Path, *, amplify: float = 10.0) -> Path:
    """Rows of clean | perturbation (amplified, centred on grey) | adversarial.

    Args:
        examples: dicts with ``x`` and ``x_adv`` ((3, H, W) tensors in [0, 1]), ``title``
            (e.g. model/attack/eps) and ``clean`` / ``adv`` captions (label and confidence).
        amplify: perturbation gain for display; the caption states it.
    """
    n = max(len(examples), 1)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.9 * n), dpi=110, squeeze=False)
    for row, ex in zip(axes, examples, strict=False):
        delta = ex["x_adv"] - ex["x"]
        shown = (0.5 + amplify * delta).clamp(0, 1)
        # the row's model/attack/eps heads its first image (a rotated label beside the row
        # collided with the captions of the row above)
        for ax, img, caption in (
            (row[0], ex["x"], f"{ex['title']}\nclean: {ex['clean']}"),
            (row[1], shown, f"perturbation x{amplify:g}\nmax {delta.abs().max() * 255:.1f}/255"),
            (row[2], ex["x_adv"], f"adversarial:\n{ex['adv']}"),
        ):
            ax.imshow(img.permute(1, 2, 0).cpu().numpy())
            ax.set_title(caption, fontsize=8)
            ax.axis("off")
    if not examples:
        for ax in axes[0]:
            ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, out)


def summary_key(attack: str, eps: float) -> str:
    """The MLflow name of an attack's robust accuracy at the report eps, e.g.
    ``robust_acc_pgd_at_4_255`` for 4/255 (MLflow names allow no ``@``, and a ``/`` would
    make the UI file the metric under a chart group of its own)."""
    return Eps(eps).headline(attack)


def series_key(attack: str) -> str:
    """The MLflow name of an attack's robust accuracy against eps (step = eps * 255). Named
    apart from the scalars: a series' value in the runs table is its last step (the largest
    eps), which a bare ``robust_acc_pgd`` column would pass off as the headline figure."""
    return f"robust_acc_vs_eps/{attack}"


def attach_robustness(record, rows: list[dict], *, report_eps: float | None = None) -> None:
    """Add the robustness rows of model ``record.name`` to an MLflow ``MethodRecord``.

    One series per attack (``series_key``; step = eps * 255, so the MLflow UI charts robust
    accuracy against eps), one scalar per attack and eps, and the headline scalar at
    ``report_eps`` (``summary_key``); each scalar with its 95% interval (``*_ci_low``,
    ``*_ci_high``).
    """
    for r in rows:
        if r["model"] == record.name:
            record.series.setdefault(series_key(r["attack"]), []).append(
                (round(r["eps"] * 255), r["robust_acc"])
            )
            keys = [Eps(r["eps"]).metric(r["attack"])]
            if report_eps is not None and abs(r["eps"] - report_eps) < 1e-9:
                keys.append(summary_key(r["attack"], report_eps))
            for key in keys:
                record.metrics[key] = r["robust_acc"]
                for end in ("ci_low", "ci_high"):
                    if f"robust_acc_{end}" in r:
                        record.metrics[f"{key}_{end}"] = r[f"robust_acc_{end}"]
