"""The learning-curve experiment: which adaptation method wins at which training-set size.

The lecture's claim: a linear SVM on deep features wins with a few images per class, a new top
layer in between, full fine-tuning with many. This experiment tests it on Fashion-MNIST (Debian's
``dataset-fashion-mnist`` IDX files, read with numpy + gzip), with error bars that mean what they
say:

- Images are upscaled from 28 px to ``image_size`` (>= 96 px, a size the ImageNet backbone can
  see detail at) and repeated to 3 channels: the same input for every method.
- One held-out test set of ``test_per_class`` images per class from ``t10k``, scored by every run.
- A pool of ``pool_per_class`` training images per class; each seed shuffles it on its own and
  takes a validation set (``val_per_class``, for early stopping) and then nested training subsets:
  the first N of its order for every N, so N=100 holds N=20. The pool is larger than the largest
  N, so the largest subset differs between seeds.
- The frozen backbone's features of the pool and the test set are extracted once (cached on
  disk by content); the SVM and the top layer train on them. Full fine-tuning trains through the
  backbone, so it runs only at ``full_n_per_class`` (what this CPU can train to convergence).
- Every method trains under the pipeline's protocol (its ``params.yaml`` section: early stopping
  on validation, never on test) with a step budget that scales with the training set: an epoch
  is at least ``min_epoch_images`` images (tiny sets are repeated), so a handful of images still
  gets a few hundred optimiser steps.
- Each point's interval combines the seed spread (ddof=1) and the test-set sampling
  (``transferlab.stats.seed_mean_interval``); methods are compared per N with a paired
  difference over the same test images (``paired_seed_difference``).

Progress: a features bar (img/s), then a bar over the (seed, N) points whose postfix shows the
last point's test accuracy per method, over the trainers' own bars.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from transferlab.atomic import atomic_write
from transferlab.config import LearningCurveParams, Params
from transferlab.progress import progress
from transferlab.report import save_figure
from transferlab.stats import TIE, paired_seed_difference, seed_mean_interval, wilson

log = logging.getLogger(__name__)

FASHION_CLASSES = (
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
# the seed's table (transferlab.report.training_regime): few, dozens to hundreds, 1000+ per class
REGIMES = ((25, "few (< 25/class)"), (1000, "dozens-hundreds"), (math.inf, "1000+/class"))


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array (uint8 images (N, 28, 28) or labels)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """``part`` "train" (60k) or "t10k" (10k): (images (N, 28, 28) uint8, labels (N,) int64)."""
    x = read_idx(folder / f"{part}-images-idx3-ubyte.gz")
    y = read_idx(folder / f"{part}-labels-idx1-ubyte.gz").astype(np.int64)
    return x, y


def to_rgb(x: np.ndarray, size: int) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 3, size, size) float in [0, 1] (bilinear, antialiased)."""
    t = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return t.clamp_(0, 1).expand(-1, 3, -1, -1).contiguous()


def per_class_indices(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random indices of each class (fewer where a class has fewer), sorted."""
    out = [rng.permutation(np.flatnonzero(y == c))[:n] for c in np.unique(y)]
    return np.sort(np.concatenate(out))


@dataclass(frozen=True)
class SeedSplit:
    """One seed's draw from the pool: validation indices and nested training subsets."""

    val: np.ndarray
    train: dict[int, np.ndarray]  # N per class -> indices into the pool


def seed_split(y_pool: np.ndarray, ns: tuple[int, ...], val_per_class: int, seed: int) -> SeedSplit:
    """Shuffle each class of the pool with ``seed``; the first ``val_per_class`` are validation,
    and the training subset of size N is the next N: nested across N, disjoint from validation.
    """
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(np.flatnonzero(y_pool == c)) for c in np.unique(y_pool)]
    short = [len(o) for o in orders if len(o) < val_per_class + max(ns)]
    if short:
        raise ValueError(
            f"learning_curve: a class has only {min(short)} pool images, fewer than "
            f"val_per_class + max N = {val_per_class + max(ns)}; raise pool_per_class"
        )
    val = np.sort(np.concatenate([o[:val_per_class] for o in orders]))
    train = {
        n: np.sort(np.concatenate([o[val_per_class : val_per_class + n] for o in orders]))
        for n in ns
    }
    return SeedSplit(val, train)


def repeat_to(n_items: int, min_items: int) -> np.ndarray:
    """Indices 0..n_items-1 repeated until there are at least ``min_items`` (one epoch's worth)."""
    reps = max(1, math.ceil(min_items / max(n_items, 1)))
    return np.tile(np.arange(n_items), reps)


# ------------------------------------------------------------------ features


def _features(backbone, x_u8: np.ndarray, size: int, *, precision: str, desc: str) -> np.ndarray:
    """Frozen-backbone features of 28 px images, upscaled batch by batch (the whole pool at
    96 px would take gigabytes as float tensors)."""
    out = []
    bf16 = precision == "bf16"
    with (
        torch.inference_mode(),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
        progress(desc=desc, unit="img", total=len(x_u8)) as bar,
    ):
        for i in range(0, len(x_u8), 64):
            f = backbone.features(to_rgb(x_u8[i : i + 64], size)).float().numpy()
            out.append(f)
            bar.update(len(f))
    return np.concatenate(out) if out else np.zeros((0, backbone.feature_dim), np.float32)


def cached_features(
    backbone, x_u8: np.ndarray, *, size: int, precision: str, cache_dir: Path, desc: str
) -> np.ndarray:
    """:func:`_features`, kept in ``cache_dir`` under a key of the weights, size, precision and
    pixels, so a rerun (or another N grid) skips the slowest part."""
    h = hashlib.sha256(f"{backbone.weights_digest}|{size}|{precision}".encode())
    h.update(np.ascontiguousarray(x_u8).tobytes())
    path = cache_dir / f"{h.hexdigest()[:32]}.npy"
    if path.is_file():
        log.info("learning curve: %s from %s", desc, path)
        return np.load(path)
    feats = _features(backbone, x_u8, size, precision=precision, desc=desc)
    with atomic_write(path) as f:
        np.save(f, feats)
    return feats


# ------------------------------------------------------------------ methods


@dataclass
class Fit:
    """What one method's run yields: test predictions and how training went."""

    pred: np.ndarray  # (n_test,) predicted classes
    train_acc: float | None
    seconds: float
    extra: dict


@dataclass(frozen=True)
class CurveData:
    """Everything a method may train on for one (seed, N) point."""

    n_classes: int
    f_train: np.ndarray
    y_train: np.ndarray
    f_val: np.ndarray
    y_val: np.ndarray
    f_test: np.ndarray
    images: Callable[[str], torch.Tensor]  # "train" | "val" | "test" -> (N, 3, S, S) in [0, 1]
    seed: int
    min_epoch_images: int
    image_size: int


def _fit_svm(params: Params, d: CurveData) -> Fit:
    """One fit per ``svm.C`` on the training subset, the C with the best validation accuracy
    kept: as many trials as the grid, chosen on validation like the trained methods' early
    stopping (k-fold CV would cost k + 1 fits per C, minutes per point at N = 1000 here)."""
    from transferlab.classifiers.svm import fit_svm

    sp = params.svm
    t = time.perf_counter()
    best = None
    for c in sp.C:
        fit = fit_svm(
            d.f_train,
            d.y_train,
            C_grid=(c,),
            cv=sp.cv,
            class_weight=sp.class_weight,
            max_iter=sp.max_iter,
            seed=d.seed,
        )
        val_acc = float((fit.pipeline.predict(d.f_val) == d.y_val).mean())
        if best is None or val_acc > best[0]:  # the first of equal scores, as GridSearchCV
            best = (val_acc, c, fit)
    val_acc, best_c, fit = best
    train_acc = float((fit.pipeline.predict(d.f_train) == d.y_train).mean())
    return Fit(
        fit.pipeline.predict(d.f_test),
        train_acc,
        time.perf_counter() - t,
        {"best_C": best_c, "val_acc": val_acc},
    )


def _fit_top(params: Params, d: CurveData) -> Fit:
    from transferlab.classifiers.top import train_top
    from transferlab.classifiers.training import predict

    tp = params.top.model_copy(update={"seed": d.seed, "augment": False})
    rep = repeat_to(len(d.y_train), d.min_epoch_images)
    res = train_top(
        n_classes=d.n_classes,
        params=tp,
        x_train=torch.from_numpy(d.f_train[rep]),
        y_train=torch.from_numpy(d.y_train[rep]),
        x_val=torch.from_numpy(d.f_val),
        y_val=torch.from_numpy(d.y_val),
    )
    kept = res.history[res.best_epoch]
    return Fit(
        predict(res.head, torch.from_numpy(d.f_test)),
        kept["train_acc"],
        res.seconds,
        {"best_epoch": res.best_epoch, "epochs_run": len(res.history), "val_acc": kept["val_acc"]},
    )


def _fit_full(params: Params, d: CurveData) -> Fit:
    from transferlab.backbones import load_backbone
    from transferlab.classifiers.full import train_full
    from transferlab.classifiers.training import predict, spec_at_size

    fp = params.full.model_copy(
        update={"seed": d.seed, "resume": False, "image_size": d.image_size}
    )
    backbone = load_backbone(params.features.backbone, params.features.pretrained)
    backbone.spec = spec_at_size(backbone.spec, d.image_size)
    rep = torch.from_numpy(repeat_to(len(d.y_train), d.min_epoch_images))
    res = train_full(
        backbone=backbone,
        n_classes=d.n_classes,
        params=fp,
        x_train=d.images("train")[rep],
        y_train=torch.from_numpy(d.y_train)[rep],
        x_val=d.images("val"),
        y_val=torch.from_numpy(d.y_val),
    )

    def model(x: torch.Tensor) -> torch.Tensor:
        return res.head(res.backbone.features(x))

    kept = res.history[res.best_epoch]
    return Fit(
        predict(model, d.images("test"), batch_size=64, desc="full: test set"),
        kept["train_acc"],
        res.seconds,
        {"best_epoch": res.best_epoch, "epochs_run": len(res.history), "val_acc": kept["val_acc"]},
    )


@dataclass(frozen=True)
class Trainer:
    """How a method trains on one point's arrays (the pipeline's stages read files instead;
    this is the in-memory counterpart, under the same ``params.yaml`` section)."""

    fit: Callable[[Params, CurveData], Fit]
    trains_backbone: bool = False


TRAINERS: dict[str, Trainer] = {
    "svm": Trainer(_fit_svm),
    "top": Trainer(_fit_top),
    "full": Trainer(_fit_full, trains_backbone=True),
}


def with_overrides(params: Params) -> Params:
    """``params`` with ``learning_curve.method_overrides`` applied to the method sections
    (validated like the sections themselves)."""
    updates = {}
    for method, over in params.learning_curve.method_overrides.items():
        section = getattr(params, method, None)
        if section is None:
            raise ValueError(
                f"learning_curve.method_overrides: no params section {method!r}; "
                f"use one of {list(params.learning_curve.methods)}"
            )
        updates[method] = type(section).model_validate({**section.model_dump(), **over})
    return params.model_copy(update=updates)


def _ns_for(lc: LearningCurveParams, method: str) -> tuple[int, ...]:
    """The N grid of ``method``: those that train the backbone get the smaller one (CPU time)."""
    return lc.backbone_n_per_class if TRAINERS[method].trains_backbone else lc.n_per_class


def backbone_methods(lc: LearningCurveParams) -> list[str]:
    return [m for m in lc.methods if m in TRAINERS and TRAINERS[m].trains_backbone]


# ------------------------------------------------------------------ the run


def run_learning_curve(
    params: Params,
    *,
    cache_dir: Path,
    on_run: Callable[[list[dict], dict], None] | None = None,
) -> tuple[list[dict], dict[tuple[str, int, int], np.ndarray]]:
    """Train every method on every (seed, N) subset and score it on the shared test set.

    ``on_run(rows, outcomes)`` is called after every run (the experiment rewrites its outputs
    there, so a run stopped for time keeps what it finished).

    Returns:
        rows: one per (method, n_per_class, seed): test_acc with its Wilson interval, train_acc,
            seconds, n_train, best_epoch / epochs_run / val_acc where the method has them.
        outcomes: (method, n_per_class, seed) -> (n_test,) bool, True where the run is right
            (for the paired comparisons).
    """
    from transferlab.backbones import load_backbone

    lc = params.learning_curve
    params = with_overrides(params)
    unknown = [m for m in lc.methods if m not in TRAINERS]
    if unknown:
        raise ValueError(
            f"learning_curve.methods: {unknown} have no learning-curve trainer; "
            f"allowed: {sorted(TRAINERS)}"
        )
    x_all, y_all = load_fashion(lc.idx_dir, "train")
    x_t, y_t = load_fashion(lc.idx_dir, "t10k")
    rng = np.random.default_rng(12345)
    test_idx = per_class_indices(y_t, lc.test_per_class, rng)
    pool_idx = per_class_indices(y_all, lc.pool_per_class, rng)
    x_pool, y_pool = x_all[pool_idx], y_all[pool_idx]
    x_test_u8, y_test = x_t[test_idx], y_t[test_idx]
    frozen = load_backbone(params.features.backbone, params.features.pretrained)
    t0 = time.perf_counter()
    feats = {
        "pool": cached_features(
            frozen,
            x_pool,
            size=lc.image_size,
            precision=lc.precision,
            cache_dir=cache_dir,
            desc="learning curve: pool features",
        ),
        "test": cached_features(
            frozen,
            x_test_u8,
            size=lc.image_size,
            precision=lc.precision,
            cache_dir=cache_dir,
            desc="learning curve: test features",
        ),
    }
    log.info("learning curve: features ready in %.1f s", time.perf_counter() - t0)
    x_test = to_rgb(x_test_u8, lc.image_size)
    all_ns = tuple(sorted({n for m in lc.methods for n in _ns_for(lc, m)}))
    splits = {seed: seed_split(y_pool, all_ns, lc.val_per_class, seed) for seed in lc.seeds}
    # the cheap methods (on cached features) first, every seed; then those that train the
    # backbone, seed by seed with the largest N first: a run stopped for time has finished
    # the whole of the first part and as many seeds as it could of the second
    cheap = [m for m in lc.methods if not TRAINERS[m].trains_backbone]
    costly = backbone_methods(lc)
    jobs = [(m, seed, n) for seed in lc.seeds for n in lc.n_per_class for m in cheap]
    jobs += [
        (m, seed, n)
        for seed in lc.backbone_seeds or lc.seeds
        for n in sorted(lc.backbone_n_per_class, reverse=True)
        for m in costly
    ]
    rows: list[dict] = []
    outcomes: dict[tuple[str, int, int], np.ndarray] = {}
    n_test = len(y_test)
    # updated by hand, so the count and the last run's accuracy show together
    bar = progress(desc="learning curve", unit="run", total=len(jobs), leave=True)
    for method, seed, n in jobs:
        bar.set_description(f"learning curve: {method}, N={n}/class, seed {seed}", refresh=False)
        split = splits[seed]
        sub = split.train[n]
        parts = {"train": sub, "val": split.val}

        def images(part: str, parts=parts) -> torch.Tensor:
            return x_test if part == "test" else to_rgb(x_pool[parts[part]], lc.image_size)

        data = CurveData(
            n_classes=len(FASHION_CLASSES),
            f_train=feats["pool"][sub],
            y_train=y_pool[sub],
            f_val=feats["pool"][split.val],
            y_val=y_pool[split.val],
            f_test=feats["test"],
            images=images,
            seed=seed,
            min_epoch_images=lc.min_epoch_images,
            image_size=lc.image_size,
        )
        fit = TRAINERS[method].fit(params, data)
        correct = fit.pred == y_test
        k = int(correct.sum())
        lo, hi = wilson(k, n_test)
        outcomes[(method, n, seed)] = correct
        rows.append(
            {
                "method": method,
                "n_per_class": n,
                "seed": seed,
                "n_train": int(len(sub)),
                "n_test": n_test,
                "test_acc": k / n_test,
                "test_acc_ci_low": lo,
                "test_acc_ci_high": hi,
                "train_acc": fit.train_acc,
                "seconds": fit.seconds,
                **fit.extra,
            }
        )
        bar.set_postfix({method: round(k / n_test, 3)}, refresh=False)
        bar.update()
        log.info(
            "%s N=%d seed=%d: test acc %.3f (%.0f s)", method, n, seed, k / n_test, fit.seconds
        )
        if on_run is not None:
            on_run(rows, outcomes)
    bar.close()
    return rows, outcomes


# ------------------------------------------------------------------ summary


def summarise(
    rows: list[dict], outcomes: dict[tuple[str, int, int], np.ndarray] | None = None
) -> list[dict]:
    """Per N: each method's mean over seeds with its interval (seeds + test sampling, ddof=1),
    the method with the highest mean, and each pair's paired difference.

    Returns:
        One dict per N: ``n_per_class``, ``<m>_mean``/``_ci_low``/``_ci_high``/``_seeds``/
        ``_seconds`` per method run there, ``best``, and ``pairs``: a list of
        {"a", "b", "diff", "ci_low", "ci_high", "verdict"} (verdict relative to ``a``).
    """
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for n in sorted({r["n_per_class"] for r in rows}):
        row: dict = {"n_per_class": n, "pairs": []}
        here = []
        for m in methods:
            mine = [r for r in rows if r["n_per_class"] == n and r["method"] == m]
            if not mine:
                continue
            here.append(m)
            mean, lo, hi = seed_mean_interval([r["test_acc"] for r in mine], mine[0]["n_test"])
            row.update(
                {
                    f"{m}_mean": mean,
                    f"{m}_ci_low": lo,
                    f"{m}_ci_high": hi,
                    f"{m}_seeds": len(mine),
                    f"{m}_seconds": float(np.mean([r["seconds"] for r in mine])),
                }
            )
        row["best"] = max(here, key=lambda m: row[f"{m}_mean"])
        if outcomes is not None:
            for i, a in enumerate(here):
                for b in here[i + 1 :]:
                    seeds = sorted(
                        {s for (m, nn, s) in outcomes if m == a and nn == n}
                        & {s for (m, nn, s) in outcomes if m == b and nn == n}
                    )
                    if not seeds:
                        continue
                    d, lo, hi = paired_seed_difference(
                        [outcomes[(a, n, s)] for s in seeds], [outcomes[(b, n, s)] for s in seeds]
                    )
                    verdict = TIE if lo <= 0 <= hi else ("win" if d > 0 else "loss")
                    row["pairs"].append(
                        {"a": a, "b": b, "diff": d, "ci_low": lo, "ci_high": hi, "verdict": verdict}
                    )
        out.append(row)
    return out


def regime(n_per_class: int) -> str:
    return next(name for upper, name in REGIMES if n_per_class < upper)


def _beats(row: dict, a: str, b: str) -> str:
    """ "win" / "loss" / "tie" of ``a`` against ``b`` at this N (paired when available)."""
    for p in row["pairs"]:
        if (p["a"], p["b"]) == (a, b):
            return p["verdict"]
        if (p["a"], p["b"]) == (b, a):
            return {"win": "loss", "loss": "win"}.get(p["verdict"], TIE)
    # no outcomes: interval overlap
    if row[f"{a}_ci_low"] > row[f"{b}_ci_high"]:
        return "win"
    if row[f"{a}_ci_high"] < row[f"{b}_ci_low"]:
        return "loss"
    return TIE


def lecture_verdicts(summary: list[dict], order: tuple[str, ...]) -> list[dict]:
    """Does the lecture's ordering hold at each N?

    ``order`` names the methods from the few-images winner to the many-images winner (one per
    regime of ``REGIMES``). At each N the regime's expected winner "holds" if it is
    significantly better than every other method run there, "tie (not refuted, not
    confirmed)" if no method is significantly better than it but some tie, and "does not hold"
    if one beats it.
    """
    out = []
    for row in summary:
        band = regime(row["n_per_class"])
        idx = [name for _, name in REGIMES].index(band)
        expected = order[min(idx, len(order) - 1)]
        others = [m for m in order if m != expected and f"{m}_mean" in row]
        if f"{expected}_mean" not in row:
            out.append(
                {
                    "n_per_class": row["n_per_class"],
                    "regime": band,
                    "expected": expected,
                    "verdict": "not measured",
                    "detail": f"{expected} was not run at this N",
                }
            )
            continue
        vs = {m: _beats(row, expected, m) for m in others}
        if any(v == "loss" for v in vs.values()):
            verdict = "does not hold"
        elif vs and all(v == "win" for v in vs.values()):
            verdict = "holds"
        else:
            verdict = "tie (not refuted, not confirmed)" if vs else "only method run"
        detail = ", ".join(f"{v} vs {m}" for m, v in vs.items())
        out.append(
            {
                "n_per_class": row["n_per_class"],
                "regime": band,
                "expected": expected,
                "verdict": verdict,
                "detail": detail,
            }
        )
    return out


def _cell(row: dict, m: str, seeds: int | None = None) -> str:
    if f"{m}_mean" not in row:
        return "-"
    cell = f"{row[f'{m}_mean']:.3f} [{row[f'{m}_ci_low']:.3f}, {row[f'{m}_ci_high']:.3f}]"
    if seeds is not None and row[f"{m}_seeds"] != seeds:
        k = row[f"{m}_seeds"]
        cell += f" ({k} seed{'s' if k != 1 else ''})"
    return cell


def markdown_table(summary: list[dict]) -> str:
    """Mean test accuracy over seeds and its 95% interval per method and N, and the best."""
    methods = list(
        dict.fromkeys(k[: -len("_mean")] for r in summary for k in r if k.endswith("_mean"))
    )
    lines = [
        "| N per class | " + " | ".join(methods) + " | best |",
        "|---:|" + "---:|" * len(methods) + ":---|",
    ]
    seeds = max((r[f"{m}_seeds"] for r in summary for m in methods if f"{m}_seeds" in r), default=0)
    for r in summary:
        cells = [_cell(r, m, seeds) for m in methods]
        lines.append(f"| {r['n_per_class']} | " + " | ".join(cells) + f" | {r['best']} |")
    return "\n".join(lines) + "\n"


def pairs_table(summary: list[dict]) -> str:
    """Paired differences (A - B, same test images) with their 95% intervals."""
    lines = ["| N per class | A - B | difference [95% CI] | verdict |", "|---:|:---|---:|:---|"]
    for r in summary:
        for p in r["pairs"]:
            said = {"win": f"{p['a']} better", "loss": f"{p['b']} better"}.get(p["verdict"], TIE)
            lines.append(
                f"| {r['n_per_class']} | {p['a']} - {p['b']} | {p['diff']:+.3f} "
                f"[{p['ci_low']:+.3f}, {p['ci_high']:+.3f}] | {said} |"
            )
    return "\n".join(lines) + "\n"


def verdicts_table(verdicts: list[dict]) -> str:
    lines = ["| N per class | regime | lecture's pick | verdict | against the others |"]
    lines.append("|---:|:---|:---|:---|:---|")
    for v in verdicts:
        lines.append(
            f"| {v['n_per_class']} | {v['regime']} | {v['expected']} | {v['verdict']} | "
            f"{v['detail']} |"
        )
    return "\n".join(lines) + "\n"


def plot_curve(summary: list[dict], out: Path, *, title: str) -> Path:
    """Test accuracy against N per class (log x): mean over seeds with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(
        dict.fromkeys(k[: -len("_mean")] for r in summary for k in r if k.endswith("_mean"))
    )
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for m in methods:
        pts = [r for r in summary if f"{m}_mean" in r]
        mean = np.array([r[f"{m}_mean"] for r in pts])
        ax.errorbar(
            [r["n_per_class"] for r in pts],
            mean,
            yerr=[
                mean - np.array([r[f"{m}_ci_low"] for r in pts]),
                np.array([r[f"{m}_ci_high"] for r in pts]) - mean,
            ],
            marker="o",
            capsize=3,
            label=m,
        )
    ax.set_xscale("log")
    ax.set_xlabel("training images per class (log scale)")
    ax.set_ylabel("test accuracy (95% interval: seeds + test sampling)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return save_figure(fig, out)


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_outputs(
    rows: list[dict],
    outcomes: dict[tuple[str, int, int], np.ndarray] | None,
    lc: LearningCurveParams,
    root: Path,
    command: str,
    *,
    seconds: float | None = None,
    settings: str = "",
    partial: bool = False,
) -> dict:
    """``runs.csv`` (every run), ``outcomes.npz`` (every run's per-image outcomes, for other
    comparisons), ``summary.md`` (tables, verdicts, the command, ``settings``), ``curve.png``."""
    import csv
    import io

    out = root / lc.out_dir
    summary = summarise(rows, outcomes)
    verdicts = lecture_verdicts(summary, lc.methods)
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    _write_text(out / "runs.csv", buf.getvalue())
    if outcomes:
        with atomic_write(out / "outcomes.npz") as f:
            np.savez_compressed(f, **{f"{m}_n{n}_seed{s}": v for (m, n, s), v in outcomes.items()})
    n_test = rows[0]["n_test"] if rows else 0
    full_ns = ", ".join(str(n) for n in lc.backbone_n_per_class)
    full_seeds = list(lc.backbone_seeds or lc.seeds)
    costly = backbone_methods(lc)
    backbone_note = (
        f" Methods that train the backbone ({', '.join(costly)}) ran at N = {full_ns} per "
        f"class with seeds {full_seeds}: what this shared 2-core CPU trains to convergence "
        "within the run's budget."
        if any(r["method"] in costly for r in rows)
        else f" Methods that train the backbone ({', '.join(costly)}) finished no run: see below."
        if costly
        else ""
    )
    timing = ""
    if seconds:
        timing = (
            f" Unfinished: {len(rows)} runs in {seconds / 60:.1f} min so far."
            if partial
            else f" The whole run took {seconds / 60:.1f} min on this machine (2 cores, shared)."
        )
    md = (
        "# Learning curve: which adaptation wins at which training-set size (Fashion-MNIST)\n\n"
        f"Reproduce with:\n\n```\n{command}\n```\n\n"
        f"Images upscaled from 28 to {lc.image_size} px; {n_test} test images ({lc.test_per_class}"
        f" per class, t10k), scored by every run; seeds {list(lc.seeds)}, each drawing its own "
        f"nested training subsets and a {lc.val_per_class}-per-class validation set (early "
        f"stopping) from a {lc.pool_per_class}-per-class pool. Cells: mean test accuracy over "
        "the seeds [95% interval combining the seed spread (ddof=1) and the test-set sampling]."
        + backbone_note
        + f"{timing}\n\n"
        + (
            f"Method settings (their sections + `method_overrides`): {settings}\n\n"
            if settings
            else ""
        )
        + markdown_table(summary)
        + "\n## Does the lecture's ordering hold?\n\n"
        + f"The lecture: {lc.methods[0]} with a few images per class, "
        + (f"{lc.methods[1]} in between, " if len(lc.methods) > 2 else "")
        + f"{lc.methods[-1]} with many. At each N, the pick of its regime against every other "
        "method (paired difference on the same test images, averaged over seeds, 95% interval):"
        "\n\n"
        + verdicts_table(verdicts)
        + "\n## Paired differences\n\n"
        + pairs_table(summary)
        + "\n`runs.csv` has every single run (with each run's own Wilson interval over the test "
        "images, its best epoch and training time).\n"
    )
    _write_text(out / "summary.md", md)
    png = plot_curve(
        summary,
        out / "curve.png",
        title=f"Fashion-MNIST at {lc.image_size} px, {len(lc.seeds)} seeds, {n_test} test images",
    )
    return {
        "summary": summary,
        "verdicts": verdicts,
        "csv": str(out / "runs.csv"),
        "plot": str(png),
        "table": str(out / "summary.md"),
    }


COMMAND = "transferlab experiment learning-curve --params params.yaml"


def load_outputs(folder: Path) -> tuple[list[dict], dict[tuple[str, int, int], np.ndarray]]:
    """``runs.csv`` and ``outcomes.npz`` of a finished (or stopped) run, back as the rows and
    outcomes :func:`write_outputs` takes: to rewrite the summary, or to merge runs of parts of
    the grid (say, the backbone-training methods run apart)."""
    import csv
    import re

    with open(folder / "runs.csv", newline="", encoding="utf-8") as f:
        raw = list(csv.DictReader(f))
    ints = {"n_per_class", "seed", "n_train", "n_test", "best_epoch", "epochs_run"}
    rows = []
    for r in raw:
        row: dict = {}
        for k, v in r.items():
            if v == "":
                continue
            if k == "method":
                row[k] = v
            elif k in ints:
                row[k] = int(float(v))
            else:
                row[k] = float(v)
        rows.append(row)
    outcomes = {}
    with np.load(folder / "outcomes.npz") as z:
        for key in z.files:
            m = re.fullmatch(r"(.+)_n(\d+)_seed(\d+)", key)
            if m:
                outcomes[(m[1], int(m[2]), int(m[3]))] = z[key].astype(bool)
    return rows, outcomes


def method_settings(params: Params) -> str:
    """One line per method of the settings a reader needs to judge the budget it got."""
    lc = params.learning_curve
    keys = ("C", "epochs", "patience", "batch_size", "lr", "backbone_lr_ratio", "augment")
    parts = []
    for m in lc.methods:
        section = getattr(params, m, None)
        if section is None:
            continue
        dumped = section.model_dump()
        parts.append(f"`{m}`: " + ", ".join(f"{k}={dumped[k]}" for k in keys if k in dumped))
    parts.append(f"an epoch is at least {lc.min_epoch_images} images (tiny sets repeated)")
    return "; ".join(parts) + "."


def learning_curve_experiment(
    params: Params, root: Path, *, context: dict[str, str] | None = None
) -> dict:
    """The whole experiment: train, write ``<out_dir>/{runs.csv,summary.md,curve.png}``, log
    to MLflow. The one implementation the CLI, the Prefect flow and ``dvc repro`` call."""
    from transferlab.tracking import log_learning_curve

    lc = params.learning_curve
    start = time.perf_counter()
    settings = method_settings(with_overrides(params))

    def save_so_far(rows: list[dict], outcomes: dict) -> None:
        elapsed = time.perf_counter() - start
        write_outputs(
            rows, outcomes, lc, root, COMMAND, seconds=elapsed, settings=settings, partial=True
        )

    rows, outcomes = run_learning_curve(
        params, cache_dir=root / params.features.cache_dir / "learning_curve", on_run=save_so_far
    )
    seconds = time.perf_counter() - start
    out = write_outputs(rows, outcomes, lc, root, COMMAND, seconds=seconds, settings=settings)
    ids = log_learning_curve(
        params,
        root,
        rows=rows,
        summary=out["summary"],
        artifacts=[Path(out["csv"]), Path(out["table"]), Path(out["plot"])],
        tags=context,
    )
    out["mlflow"] = ids
    out["seconds"] = round(time.perf_counter() - start, 1)
    log.info("learning curve done in %.0f s", out["seconds"])
    return out
