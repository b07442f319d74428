"""The learning-curve experiment: which adaptation method wins at which training-set size.

All three methods (svm, top, full) train on the same few-shot subsets (N images per class, drawn
per seed from a fixed pool) and are scored on one held-out test set. Fashion-MNIST comes from
Debian's ``dataset-fashion-mnist`` IDX files, read here with numpy + gzip; the 28 px grey images
are upscaled to ``image_size`` and repeated to 3 channels, the same input for every method.

Progress: a features bar (img/s), then a bar over the (seed, N) points whose postfix shows the
last point's test accuracy per method, over the trainers' own bars.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from transferlab.config import FullParams, LearningCurveParams, Params, SvmParams, TopParams
from transferlab.progress import progress
from transferlab.report import save_figure

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
METHODS = ("svm", "top", "full")


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
    """(N, 28, 28) uint8 -> (N, 3, size, size) float in [0, 1] (bilinear upscaling)."""
    t = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return t.clamp_(0, 1).expand(-1, 3, -1, -1).contiguous()


def per_class_indices(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random indices of each class (fewer where a class has fewer)."""
    out = [rng.permutation(np.flatnonzero(y == c))[:n] for c in np.unique(y)]
    return np.sort(np.concatenate(out))


def _features(backbone, x: torch.Tensor, batch: int = 128, *, desc: str) -> np.ndarray:
    out = []
    with torch.inference_mode(), progress(desc=desc, unit="img", total=len(x)) as bar:
        for i in range(0, len(x), batch):
            out.append(backbone.features(x[i : i + batch]).numpy())
            bar.update(len(out[-1]))
    return np.concatenate(out)


def run_learning_curve(
    lc: LearningCurveParams,
    *,
    backbone_name: str,
    pretrained: str,
    svm: SvmParams,
    top: TopParams,
    full: FullParams,
) -> list[dict]:
    """Train every method on every (N per class, seed) subset; score on the shared test set.

    Returns:
        One row per (method, n_per_class, seed): test_acc, train_acc, seconds, n_train.
    """
    from transferlab.backbones import load_backbone
    from transferlab.classifiers.full import train_full
    from transferlab.classifiers.svm import fit_svm
    from transferlab.classifiers.top import train_top
    from transferlab.classifiers.training import accuracy, predict

    x_all, y_all = load_fashion(lc.idx_dir, "train")
    x_t, y_t = load_fashion(lc.idx_dir, "t10k")
    rng = np.random.default_rng(12345)
    test_idx = per_class_indices(y_t, lc.test_per_class, rng)
    # one pool: every seed's subset of size N is drawn from the same max(N) images per class
    pool_idx = per_class_indices(y_all, max(lc.n_per_class), rng)
    x_pool, y_pool = to_rgb(x_all[pool_idx], lc.image_size), y_all[pool_idx]
    x_test, y_test = to_rgb(x_t[test_idx], lc.image_size), y_t[test_idx]
    frozen = load_backbone(backbone_name, pretrained)
    t0 = time.perf_counter()
    f_pool = _features(frozen, x_pool, desc="learning curve: pool features")
    f_test = _features(frozen, x_test, desc="learning curve: test features")
    log.info(
        "learning curve: features for %d images in %.1f s",
        len(x_pool) + len(x_test),
        time.perf_counter() - t0,
    )
    rows: list[dict] = []
    n_classes = len(FASHION_CLASSES)
    points = [(seed, n) for seed in lc.seeds for n in lc.n_per_class]
    # updated by hand, so the count and the last point's accuracies show together
    bar = progress(desc="learning curve", unit="point", total=len(points), leave=True)
    for seed, n in points:
        bar.set_description(f"learning curve: N={n}/class, seed {seed}", refresh=False)
        sub = per_class_indices(y_pool, n, np.random.default_rng(1000 * seed + n))
        ytr = y_pool[sub]
        base = {"n_per_class": n, "seed": seed, "n_train": int(len(sub))}

        t = time.perf_counter()
        fit = fit_svm(
            f_pool[sub],
            ytr,
            C_grid=svm.C,
            cv=svm.cv,
            class_weight=svm.class_weight,
            max_iter=svm.max_iter,
            seed=seed,
        )
        rows.append(
            {
                **base,
                "method": "svm",
                "seconds": time.perf_counter() - t,
                "train_acc": accuracy(fit.pipeline.predict(f_pool[sub]), ytr),
                "test_acc": accuracy(fit.pipeline.predict(f_test), y_test),
            }
        )

        tp = top.model_copy(update={"epochs": lc.top_epochs, "seed": seed, "augment": False})
        res = train_top(
            n_classes=n_classes,
            params=tp,
            x_train=torch.from_numpy(f_pool[sub]),
            y_train=torch.from_numpy(ytr),
        )
        ft = torch.from_numpy(f_test)
        rows.append(
            {
                **base,
                "method": "top",
                "seconds": res.seconds,
                "train_acc": res.history[-1]["train_acc"],
                "test_acc": accuracy(predict(res.head, ft), y_test),
            }
        )

        steps = math.ceil(len(sub) / lc.full_batch_size)
        epochs = max(lc.full_epochs, math.ceil(lc.full_min_steps / steps))
        fp = full.model_copy(
            update={
                "epochs": epochs,
                "batch_size": lc.full_batch_size,
                "seed": seed,
                "resume": False,
                "image_size": lc.image_size,
            }
        )
        bb = load_backbone(backbone_name, pretrained)
        r = train_full(
            backbone=bb,
            n_classes=n_classes,
            params=fp,
            x_train=x_pool[sub],
            y_train=torch.from_numpy(ytr),
        )

        def model(x, bb=bb, head=r.head):
            return head(bb.features(x))

        rows.append(
            {
                **base,
                "method": "full",
                "seconds": r.seconds,
                "train_acc": r.history[-1]["train_acc"],
                "test_acc": accuracy(predict(model, x_test, batch_size=128), y_test),
                "epochs": epochs,
            }
        )
        last = {r_["method"]: round(r_["test_acc"], 3) for r_ in rows[-3:]}
        bar.set_postfix(last, refresh=False)
        bar.update()
        log.info("N=%d seed=%d: %s", n, seed, last)
    bar.close()
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std of test accuracy per (method, N), and which method wins at each N."""
    out = []
    for n in sorted({r["n_per_class"] for r in rows}):
        row: dict = {"n_per_class": n}
        for m in METHODS:
            acc = [r["test_acc"] for r in rows if r["n_per_class"] == n and r["method"] == m]
            secs = [r["seconds"] for r in rows if r["n_per_class"] == n and r["method"] == m]
            if acc:
                row[f"{m}_mean"] = float(np.mean(acc))
                row[f"{m}_std"] = float(np.std(acc))
                row[f"{m}_seconds"] = float(np.mean(secs))
        row["best"] = max(
            (m for m in METHODS if f"{m}_mean" in row), key=lambda m: row[f"{m}_mean"]
        )
        out.append(row)
    return out


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def markdown_table(summary: list[dict]) -> str:
    lines = [
        "| N per class | svm | top | full | best |",
        "|---:|---:|---:|---:|:---|",
    ]
    for r in summary:
        cells = [
            f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_std']:.3f}" if f"{m}_mean" in r else "-"
            for m in METHODS
        ]
        lines.append(f"| {r['n_per_class']} | " + " | ".join(cells) + f" | {r['best']} |")
    return "\n".join(lines) + "\n"


def plot_curve(summary: list[dict], out: Path, *, title: str) -> Path:
    """Test accuracy against N per class (log x), mean ± std over seeds, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for m in METHODS:
        pts = [r for r in summary if f"{m}_mean" in r]
        ax.errorbar(
            [r["n_per_class"] for r in pts],
            [r[f"{m}_mean"] for r in pts],
            yerr=[r[f"{m}_std"] for r in pts],
            marker="o",
            capsize=3,
            label=m,
        )
    ax.set_xscale("log")
    ax.set_xlabel("training images per class (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, out)


def write_outputs(rows: list[dict], lc: LearningCurveParams, root: Path, command: str) -> dict:
    """``runs.csv`` (every run), ``summary.md`` (the table + the command), ``curve.png``."""
    import csv
    import io

    out = root / lc.out_dir
    summary = summarise(rows)
    buf = io.StringIO()
    keys = sorted({k for r in rows for k in r})
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    _atomic_text(out / "runs.csv", buf.getvalue())
    md = (
        "# Learning curve: svm vs top vs full (Fashion-MNIST)\n\n"
        f"Reproduce with:\n\n```\n{command}\n```\n\n"
        f"Images upscaled to {lc.image_size} px, seeds {list(lc.seeds)}, "
        f"{lc.test_per_class} test images per class (t10k), mean ± std of test accuracy.\n\n"
        + markdown_table(summary)
    )
    _atomic_text(out / "summary.md", md)
    png = plot_curve(
        summary,
        out / "curve.png",
        title=f"Fashion-MNIST at {lc.image_size} px, {len(lc.seeds)} seeds",
    )
    return {
        "summary": summary,
        "csv": str(out / "runs.csv"),
        "plot": str(png),
        "table": str(out / "summary.md"),
    }


COMMAND = "transferlab experiment learning-curve --params params.yaml"


def learning_curve_experiment(
    params: Params, root: Path, *, context: dict[str, str] | None = None
) -> dict:
    """The whole experiment: train, write ``<out_dir>/{runs.csv,summary.md,curve.png}``, log
    to MLflow. The one implementation the CLI, the Prefect flow and ``dvc repro`` call."""
    from transferlab.tracking import log_learning_curve

    lc = params.learning_curve
    start = time.perf_counter()
    rows = run_learning_curve(
        lc,
        backbone_name=params.features.backbone,
        pretrained=params.features.pretrained,
        svm=params.svm,
        top=params.top,
        full=params.full,
    )
    out = write_outputs(rows, lc, root, COMMAND)
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
