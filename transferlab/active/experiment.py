"""The budget experiment: which query strategy to use when labels cost money.

From a seed set (``seed_per_class`` labelled images per class) a simulated annotator labels
``batch`` more images per round, picked by each strategy from a pool, until ``budget`` labels.
After every round the learner (svm or top, on cached backbone features) is retrained and scored
on a held-out test set that never enters the pool. Every (dataset, learner, strategy, seed)
is one curve; the summary gives, per strategy, accuracy against labels with a Wilson interval
(test-set sampling) and the seed spread (selection and training), the area under the curve, the
labels needed to reach ``target`` of the full-pool accuracy, and the labels needed to match
random sampling's accuracy at the full budget.

Datasets: Fashion-MNIST (Debian's IDX files, upscaled to ``image_size``) and, when the workspace
has them, the pipeline's own photos (``features/features.npz`` + ``data/split.csv``: train and
val are the pool, test is the test set).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transferlab.active.strategies import STRATEGIES, select, softmax
from transferlab.config import ActiveLearningParams, Params, SvmParams, TopParams
from transferlab.progress import progress
from transferlab.stats import wilson

log = logging.getLogger(__name__)

COMMAND = "transferlab experiment active-learning --params params.yaml"


@dataclass(frozen=True)
class Dataset:
    """Cached features of a pool and a test set that share no image."""

    name: str
    x_pool: np.ndarray  # (N, D) float32
    y_pool: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]


# ------------------------------------------------------------------ data


def fashion_dataset(al: ActiveLearningParams, *, backbone: str, pretrained: str, cache: Path):
    """Fashion-MNIST features: ``pool_per_class`` train images and ``test_per_class`` t10k
    images per class, drawn once (seed 12345); extracted once, then read from ``cache``."""
    from transferlab.backbones import load_backbone
    from transferlab.experiments.learning_curve import (
        FASHION_CLASSES,
        cached_features,
        load_fashion,
        per_class_indices,
    )

    x_tr, y_tr = load_fashion(al.idx_dir, "train")
    x_t, y_t = load_fashion(al.idx_dir, "t10k")
    rng = np.random.default_rng(12345)
    # the pool comes from the train files and the test set from t10k: disjoint by design
    pool = per_class_indices(y_tr, al.pool_per_class, rng)
    test = per_class_indices(y_t, al.test_per_class, rng)
    bb = load_backbone(backbone, pretrained)
    t0 = time.perf_counter()
    feats = {
        name: cached_features(
            bb,
            x,
            size=al.image_size,
            precision="fp32",
            cache_dir=cache,
            desc=f"active learning: {name} features",
        )
        for name, x in (("pool", x_tr[pool]), ("test", x_t[test]))
    }
    log.info("fashion features: %d images, %.1f s", len(pool) + len(test), time.perf_counter() - t0)
    return Dataset(
        "fashion_mnist",
        feats["pool"].astype(np.float32),
        y_tr[pool].astype(np.int64),
        feats["test"].astype(np.float32),
        y_t[test].astype(np.int64),
        tuple(FASHION_CLASSES),
    )


def photos_dataset(root: Path) -> Dataset | None:
    """The workspace's own images: train + val are the pool, test stays out. ``None`` without
    ``features/features.npz`` and ``data/split.csv`` (run the pipeline first)."""
    from transferlab.layout import FEATURES, SPLIT, labelled_features

    if not (root / FEATURES).exists() or not (root / SPLIT).exists():
        return None
    data, classes = labelled_features(root)
    return Dataset(
        "photos",
        np.concatenate([data["x_train"], data["x_val"]]).astype(np.float32),
        np.concatenate([data["y_train"], data["y_val"]]),
        data["x_test"].astype(np.float32),
        data["y_test"],
        tuple(classes),
    )


# ------------------------------------------------------------------ learners


def fit_predict(
    learner: str,
    x: np.ndarray,
    y: np.ndarray,
    queries: list[np.ndarray],
    *,
    n_classes: int,
    svm: SvmParams,
    top: TopParams,
    seed: int,
) -> list[np.ndarray]:
    """Train ``learner`` on (x, y) and return its (N, C) class scores for each array of
    ``queries`` (SVM decision values or head logits; columns are class indices)."""
    if learner == "svm":
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import LinearSVC

        from transferlab.classifiers.svm import fit_svm

        if len(svm.C) == 1:
            # one C, no CV: liblinear's dual solver, which "auto" picks anyway below 1280
            # images and which is many times faster than the primal on the full pool at small C
            pipe = make_pipeline(
                StandardScaler(),
                LinearSVC(
                    C=svm.C[0],
                    dual=True,
                    class_weight=svm.class_weight,
                    max_iter=svm.max_iter,
                    random_state=seed,
                ),
            ).fit(x, y)
        else:
            pipe = fit_svm(
                x,
                y,
                C_grid=svm.C,
                cv=svm.cv,
                class_weight=svm.class_weight,
                max_iter=svm.max_iter,
                seed=seed,
            ).pipeline
        present = pipe.classes_
        out = []
        for q in queries:
            d = pipe.decision_function(q)
            if d.ndim == 1:  # two classes seen: one decision value
                d = np.stack([-d / 2, d / 2], axis=1)
            full = np.full((len(q), n_classes), -1e9)
            full[:, present] = d
            out.append(full)
        return out
    if learner == "top":
        from transferlab.classifiers.top import train_top

        res = train_top(
            n_classes=n_classes,
            params=top.model_copy(update={"seed": seed, "augment": False}),
            x_train=torch.from_numpy(x),
            y_train=torch.from_numpy(y),
        )
        with torch.no_grad():
            return [res.head(torch.from_numpy(q)).numpy() for q in queries]
    raise ValueError(f"unknown learner {learner!r}; active learning supports: svm, top")


# ------------------------------------------------------------------ simulation


def seed_set(y: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` random pool indices of each class (the labels a user starts with)."""
    return np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)]
    )


def simulate(
    ds: Dataset,
    *,
    learner: str,
    strategy: str,
    seed: int,
    seed_per_class: int,
    batch: int,
    budget: int,
    svm: SvmParams,
    top: TopParams,
) -> list[dict]:
    """One labelling run: seed set, then rounds of ``batch`` picks until ``budget`` labels.

    Only pool images are ever picked or trained on; the test set is only scored.

    Returns:
        One row per round: labels, test_acc, correct, n_test (and the ids to reproduce it).
    """
    rng = np.random.default_rng(seed)
    labelled = seed_set(ds.y_pool, seed_per_class, rng)
    budget = min(budget, len(ds.y_pool))
    rows = []
    n_classes = len(ds.classes)
    while True:
        mask = np.zeros(len(ds.y_pool), dtype=bool)
        mask[labelled] = True
        pool_idx = np.flatnonzero(~mask)
        # the pool is scored only while images are left in it
        s_test, *s_pool = fit_predict(
            learner,
            ds.x_pool[labelled],
            ds.y_pool[labelled],
            [ds.x_test] + ([ds.x_pool[pool_idx]] if len(pool_idx) else []),
            n_classes=n_classes,
            svm=svm,
            top=top,
            seed=seed,
        )
        correct = int((s_test.argmax(1) == ds.y_test).sum())
        rows.append(
            {
                "dataset": ds.name,
                "learner": learner,
                "strategy": strategy,
                "seed": seed,
                "labels": int(len(labelled)),
                "correct": correct,
                "n_test": int(len(ds.y_test)),
                "test_acc": correct / len(ds.y_test),
            }
        )
        if len(labelled) >= budget or len(pool_idx) == 0:
            return rows
        take = min(batch, budget - len(labelled), len(pool_idx))
        sel = select(
            strategy,
            budget=take,
            features=ds.x_pool[pool_idx],
            labelled=ds.x_pool[labelled],
            probs=softmax(s_pool[0]),
            seed=int(rng.integers(2**31 - 1)),
        )
        labelled = np.concatenate([labelled, pool_idx[sel.indices]])


def full_pool_accuracy(ds: Dataset, learner: str, *, svm: SvmParams, top: TopParams) -> float:
    """The learner trained on every pool image: the ceiling the curves are measured against."""
    (s,) = fit_predict(
        learner,
        ds.x_pool,
        ds.y_pool,
        [ds.x_test],
        n_classes=len(ds.classes),
        svm=svm,
        top=top,
        seed=0,
    )
    return float((s.argmax(1) == ds.y_test).mean())


# ------------------------------------------------------------------ summary


def summarise(rows: list[dict], full_acc: dict[tuple[str, str], float], target: float) -> dict:
    """Curves and per-strategy figures.

    Returns:
        ``{"curve": [...], "strategies": [...]}``: the curve has, per (dataset, learner,
        strategy, labels), the mean test accuracy over seeds, its seed std, and the Wilson 95%
        interval of the mean accuracy at the test set's size; the strategy rows have the
        normalised area under the curve (mean and std over seeds), the labels to reach
        ``target`` x the full-pool accuracy, and the labels to match random's final accuracy.
    """
    curve, strat = [], []
    groups = sorted({(r["dataset"], r["learner"], r["strategy"]) for r in rows})
    for ds, ln, st in groups:
        mine = [r for r in rows if (r["dataset"], r["learner"], r["strategy"]) == (ds, ln, st)]
        labels = sorted({r["labels"] for r in mine})
        points = []
        for n in labels:
            at = [r for r in mine if r["labels"] == n]
            acc = np.array([r["test_acc"] for r in at])
            n_test = at[0]["n_test"]
            lo, hi = wilson(round(acc.mean() * n_test), n_test)
            points.append(
                {
                    "dataset": ds,
                    "learner": ln,
                    "strategy": st,
                    "labels": n,
                    "acc_mean": float(acc.mean()),
                    "acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                    "wilson_low": lo,
                    "wilson_high": hi,
                    "seeds": len(acc),
                }
            )
        curve.extend(points)
        aucs = []
        for s in sorted({r["seed"] for r in mine}):
            run = sorted((r for r in mine if r["seed"] == s), key=lambda r: r["labels"])
            xs = np.array([r["labels"] for r in run], dtype=float)
            ys = np.array([r["test_acc"] for r in run])
            if len(xs) > 1:
                aucs.append(float(np.trapezoid(ys, xs) / (xs[-1] - xs[0])))
        goal = target * full_acc[(ds, ln)]
        reach = next((p["labels"] for p in points if p["acc_mean"] >= goal), None)
        strat.append(
            {
                "dataset": ds,
                "learner": ln,
                "strategy": st,
                "auc_mean": float(np.mean(aucs)) if aucs else None,
                "auc_std": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0,
                "final_labels": points[-1]["labels"],
                "final_acc": points[-1]["acc_mean"],
                "full_pool_acc": full_acc[(ds, ln)],
                f"labels_to_{round(target * 100)}pct_full": reach,
            }
        )
    for s in strat:
        rnd = next(
            (
                r
                for r in strat
                if (r["dataset"], r["learner"], r["strategy"])
                == (s["dataset"], s["learner"], "random")
            ),
            None,
        )
        if rnd is None:
            continue
        pts = [
            p
            for p in curve
            if (p["dataset"], p["learner"], p["strategy"])
            == (s["dataset"], s["learner"], s["strategy"])
        ]
        hit = next((p["labels"] for p in pts if p["acc_mean"] >= rnd["final_acc"]), None)
        s["labels_to_match_random_final"] = hit
        s["fraction_of_random_labels"] = hit / rnd["final_labels"] if hit else None
    return {"curve": curve, "strategies": strat}


def _fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(summary: dict, al: ActiveLearningParams, seconds: float) -> str:
    target = f"labels_to_{round(al.target * 100)}pct_full"
    lines = [
        "# Active learning: which images to label next",
        "",
        f"Reproduce with:\n\n```\n{COMMAND}\n```\n",
        f"Seed set {al.seed_per_class} per class, rounds of {al.batch} labels up to {al.budget}, "
        f"seeds {list(al.seeds)}; Fashion-MNIST pool {al.pool_per_class} per class (train files), "
        f"test {al.test_per_class} per class (t10k files, never in the pool), "
        f"{al.image_size} px. The photos (when present): train+val pool, test split held out. "
        f"Accuracy: mean over seeds, Wilson 95% interval of that mean at the test set's size, "
        f"± seed std. AUC: area under accuracy vs labels, divided by the label range. "
        f"Ran in {seconds:.0f} s.",
        "",
        "## Per strategy",
        "",
        f"| dataset | learner | strategy | AUC | final labels | final acc | full-pool acc | "
        f"labels to {round(al.target * 100)}% of full | labels to random's final acc "
        f"(fraction) |",
        "|:--|:--|:--|--:|--:|--:|--:|--:|--:|",
    ]
    for s in summary["strategies"]:
        frac = s.get("fraction_of_random_labels")
        lines.append(
            f"| {s['dataset']} | {s['learner']} | {s['strategy']} | "
            f"{_fmt(s['auc_mean'])} ± {_fmt(s['auc_std'])} | {s['final_labels']} | "
            f"{_fmt(s['final_acc'])} | {_fmt(s['full_pool_acc'])} | "
            f"{_fmt(s[target], 'd')} | {_fmt(s.get('labels_to_match_random_final'), 'd')} "
            f"({_fmt(frac, '.0%')}) |"
        )
    lines += ["", "## Accuracy against labels", ""]
    lines += [
        "| dataset | learner | strategy | labels | acc | Wilson 95% | seed std |",
        "|:--|:--|:--|--:|--:|:--|--:|",
    ]
    for p in summary["curve"]:
        lines.append(
            f"| {p['dataset']} | {p['learner']} | {p['strategy']} | {p['labels']} | "
            f"{p['acc_mean']:.3f} | [{p['wilson_low']:.3f}, {p['wilson_high']:.3f}] | "
            f"{p['acc_std']:.3f} |"
        )
    lines += ["", "![accuracy against labels](curve.png)", ""]
    return "\n".join(lines)


def plot(summary: dict, out: Path) -> Path:
    """One panel per (dataset, learner): accuracy against labels per strategy, Wilson band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from transferlab.report import save_figure

    panels = sorted({(p["dataset"], p["learner"]) for p in summary["curve"]})
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.2 * len(panels), 4.2), dpi=110, squeeze=False
    )
    for ax, (ds, ln) in zip(axes[0], panels, strict=True):
        for st in STRATEGIES:
            pts = [
                p
                for p in summary["curve"]
                if (p["dataset"], p["learner"], p["strategy"]) == (ds, ln, st)
            ]
            if not pts:
                continue
            x = [p["labels"] for p in pts]
            (line,) = ax.plot(x, [p["acc_mean"] for p in pts], marker=".", label=st)
            ax.fill_between(
                x,
                [p["wilson_low"] for p in pts],
                [p["wilson_high"] for p in pts],
                color=line.get_color(),
                alpha=0.12,
            )
        ax.set_title(f"{ds}: {ln}")
        ax.set_xlabel("labels")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out)


# ------------------------------------------------------------------ the experiment


def active_learning_experiment(params: Params, root: Path, *, context: dict | None = None) -> dict:
    """Simulate every (dataset, learner, strategy, seed); write ``<out_dir>/{runs.csv,
    summary.json,summary.md,curve.png}`` and log an MLflow run. The one implementation the CLI,
    the Prefect flow and ``dvc repro`` call."""
    al = params.active_learning
    start = time.perf_counter()
    datasets = []
    if "fashion_mnist" in al.datasets:
        datasets.append(
            fashion_dataset(
                al,
                backbone=params.features.backbone,
                pretrained=params.features.pretrained,
                cache=root / params.features.cache_dir / "active",
            )
        )
    if "photos" in al.datasets:
        photos = photos_dataset(root)
        if photos is None:
            log.warning("active learning: no features/features.npz here; photos left out")
        else:
            datasets.append(photos)
    top = params.top.model_copy(update={"epochs": al.top_epochs})
    svm = params.svm.model_copy(update={"C": (al.svm_C,)})
    jobs = [
        (ds, ln, st, sd)
        for ds in datasets
        for ln in al.learners
        for st in al.strategies
        for sd in al.seeds
    ]
    full_acc = {}
    for ds in datasets:
        for ln in al.learners:
            full_acc[(ds.name, ln)] = full_pool_accuracy(ds, ln, svm=svm, top=top)
            log.info(
                "%s %s full pool (%d): %.3f", ds.name, ln, len(ds.y_pool), full_acc[(ds.name, ln)]
            )
    rows: list[dict] = []
    bar = progress(desc="active learning", unit="run", total=len(jobs), leave=True)
    with bar:
        for ds, ln, st, sd in jobs:
            bar.set_description(f"active learning: {ds.name} {ln} {st} seed {sd}", refresh=False)
            run = simulate(
                ds,
                learner=ln,
                strategy=st,
                seed=sd,
                seed_per_class=al.seed_per_class,
                batch=al.batch if ds.name == "fashion_mnist" else al.photos_batch,
                budget=al.budget,
                svm=svm,
                top=top,
            )
            rows.extend(run)
            bar.set_postfix(
                labels=run[-1]["labels"], acc=f"{run[-1]['test_acc']:.3f}", refresh=False
            )
            bar.update()
    seconds = time.perf_counter() - start
    out = write_results(params, root, rows, full_acc, seconds, context=context)
    return {"runs": len(jobs), "seconds": round(seconds, 1), **out}


def write_results(
    params: Params,
    root: Path,
    rows: list[dict],
    full_acc: dict[tuple[str, str], float],
    seconds: float,
    *,
    context: dict | None = None,
) -> dict:
    """Summarise ``rows`` and write ``<out_dir>/{runs.csv,summary.json,summary.md,curve.png}``
    (atomically), then log the MLflow run. Also merges runs made in parts (``merge_parts``)."""
    from transferlab.atomic import atomic_write
    from transferlab.stages import write_csv, write_json
    from transferlab.tracking.active_learning import log_active_learning

    al = params.active_learning
    summary = summarise(rows, full_acc, al.target)
    out = root / al.out_dir
    write_csv(out / "runs.csv", rows)
    write_json(out / "summary.json", {**summary, "seconds": round(seconds, 1)})
    with atomic_write(out / "summary.md", "w", encoding="utf-8") as f:
        f.write(markdown(summary, al, seconds))
    png = plot(summary, out / "curve.png")
    ids = log_active_learning(
        params,
        root,
        summary=summary,
        artifacts=[out / "runs.csv", out / "summary.md", out / "summary.json", png],
        tags=context,
    )
    return {"summary": str(out / "summary.md"), "plot": str(png), "mlflow": ids}


def merge_parts(params: Params, root: Path, parts: list[Path]) -> dict:
    """Merge experiment outputs run in parts (e.g. one process per learner, each with its own
    ``out_dir``) into ``active_learning.out_dir``: the same tables as one run would write."""
    import csv

    rows, full_acc, seconds = [], {}, 0.0
    for part in parts:
        with open(part / "runs.csv", newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                for k in ("seed", "labels", "correct", "n_test"):
                    r[k] = int(r[k])
                r["test_acc"] = float(r["test_acc"])
                rows.append(r)
        done = json.loads((part / "summary.json").read_text(encoding="utf-8"))
        seconds = max(seconds, done["seconds"])
        for s in done["strategies"]:
            full_acc[(s["dataset"], s["learner"])] = s["full_pool_acc"]
    return write_results(params, root, rows, full_acc, seconds)
