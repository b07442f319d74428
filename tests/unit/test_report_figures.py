"""The report's figures: no text collides with other text or with the plotted data, and each fits
the report's 1,100-px content column (a 1,400-px window) at its natural size."""

from __future__ import annotations

import itertools

import matplotlib
import pytest
import torch

from transferlab import report

matplotlib.use("Agg")

COLUMN_PX = 1100  # the HTML report's content width in a 1,400-px window (main max-width 1200)


@pytest.fixture
def figures(monkeypatch):
    """Every figure the plot functions save, kept open for inspection."""
    kept = []

    def keep(fig, out):
        fig.canvas.draw()
        kept.append(fig)
        fig.savefig(out, format="png")
        return out

    monkeypatch.setattr(report, "save_figure", keep)
    yield kept
    import matplotlib.pyplot as plt

    for fig in kept:
        plt.close(fig)


def texts(fig):
    """(text, window box) of every text the figure draws: titles, axis labels, the tick labels
    within the view (matplotlib keeps a few outside it, undrawn), legends, annotations."""
    renderer = fig.canvas.get_renderer()
    found = list(fig.texts)
    for ax in fig.axes:
        found += [ax.title, ax._left_title, ax._right_title]
        if ax.axison:  # ax.axis("off") hides the labels and ticks
            found += [ax.xaxis.label, ax.yaxis.label]
            for axis in (ax.xaxis, ax.yaxis):
                found += [tick.label1 for tick in axis._update_ticks()]
        found += list(ax.texts)
        if ax.get_legend() is not None:
            found += [*ax.get_legend().get_texts(), ax.get_legend().get_title()]
    return [
        (t.get_text(), t.get_window_extent(renderer))
        for t in found
        if t.get_visible() and t.get_text().strip()
    ]


def assert_readable(fig):
    width, height = fig.get_size_inches() * fig.dpi
    assert width <= COLUMN_PX
    boxes = texts(fig)
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        assert not box_a.overlaps(box_b), f"{a!r} overlaps {b!r}"
    for text, box in boxes:
        assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= width + 1 and box.y1 <= height + 1, (
            f"{text!r} is cut off"
        )


ROWS = [
    {"model": m, "attack": a, "eps": e / 255, "robust_acc": max(0.0, 0.9 - 0.1 * e - 0.05 * i)}
    for i, (m, a) in enumerate(itertools.product(["svm", "top", "full"], ["fgsm", "pgd"]))
    for e in (0, 1, 2, 4, 8)
]


def test_robustness_legend_is_beside_the_curves(figures, tmp_path):
    report.plot_robustness(ROWS, tmp_path / "r.png")
    (fig,) = figures
    assert_readable(fig)
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    assert not legend.overlaps(ax.get_window_extent(renderer))


def test_transfer_matrix_labels_do_not_run_together(figures, tmp_path):
    rows = [
        {
            "source": s,
            "target": t,
            "robust_acc": 0.5,
            "clean_acc": 0.83,
            "eps": 4 / 255,
            "attack": "fgsm",
        }
        for s in ("imagenet", "svm")
        for t in ("svm", "top", "full")
    ]
    report.plot_transfer_matrix(rows, tmp_path / "t.png")
    assert_readable(figures[0])


def test_adversarial_grid_has_a_row_per_model_and_attack(figures, tmp_path):
    examples = [
        {
            "x": torch.rand(3, 32, 32),
            "x_adv": torch.rand(3, 32, 32),
            "title": f"{m} / {a} 4/255\nfruit_vegetables",
            "clean": "fruit_vegetables (97%)",
            "adv": "plants_flowers (54%)",
        }
        for m in ("svm", "top", "full")
        for a in ("fgsm", "pgd")
    ]
    report.plot_adversarial_grid(examples, tmp_path / "a.png")
    (fig,) = figures
    assert_readable(fig)
    titles = [ax.get_title() for ax in fig.axes]
    for m, a in itertools.product(("svm", "top", "full"), ("fgsm", "pgd")):
        assert any(t.startswith(f"{m} / {a} ") for t in titles), (m, a)


@pytest.mark.parametrize(
    ("models", "attacks", "rows"),
    [(["svm", "top", "full", "adv"], ["fgsm", "pgd", "autoattack"], 8), (["svm"], ["a", "b"], 2)],
)
def test_grid_rows_show_every_model_and_attack(models, attacks, rows):
    pairs = report.grid_pairs(models, attacks, rows)
    assert len(pairs) == min(rows, len(models) * len(attacks)) and len(set(pairs)) == len(pairs)
    assert {m for m, _ in pairs} == set(models) and {a for _, a in pairs} == set(attacks)
    # model-major: each model's rows together, in the params' order
    assert pairs == sorted(pairs, key=lambda p: (models.index(p[0]), attacks.index(p[1])))
    assert report.grid_pairs(models, attacks, 100) == [(m, a) for m in models for a in attacks]
