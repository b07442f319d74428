"""Linear SVM (liblinear) on deep features, exported as a differentiable ``nn.Linear``.

The SVM's global optimum needs few images. Standardisation is folded into the linear layer,
so the exported classifier maps raw backbone features straight to decision values and attacks
reach it end to end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.base import clone
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from torch import nn

from transferlab.progress import progress


@dataclass
class SvmFit:
    pipeline: Pipeline
    best_C: float
    grid_scores: dict[float, float]  # C -> mean CV accuracy
    seconds: float


def fit_svm(
    x: np.ndarray,
    y: np.ndarray,
    *,
    C_grid: tuple[float, ...],
    cv: int,
    class_weight: str | None = None,
    max_iter: int = 10_000,
    seed: int = 0,
) -> SvmFit:
    """Standardise, then pick ``C`` by stratified CV and refit on all of ``x``.

    What ``GridSearchCV(refit=True)`` does with the default accuracy score (same folds, same
    choice: the first C with the highest mean fold accuracy), written out so that a bar can count
    the fits: with a few hundred images of 1280 features they take seconds to tens of seconds.

    Args:
        x: (N, D) float features. y: (N,) int labels.
    """
    start = time.perf_counter()
    pipe = Pipeline(
        [
            ("scale", StandardScaler()),
            (
                "svc",
                LinearSVC(
                    dual="auto", class_weight=class_weight, max_iter=max_iter, random_state=seed
                ),
            ),
        ]
    )
    folds = min(cv, int(np.bincount(y).min()))
    if folds < 2 or len(C_grid) == 1:
        pipe.set_params(svc__C=C_grid[0]).fit(x, y)
        return SvmFit(pipe, C_grid[0], {}, time.perf_counter() - start)
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y))
    means = []
    with progress(
        desc=f"svm: C by {folds}-fold CV", unit="fit", total=len(C_grid) * folds + 1
    ) as bar:
        for c in C_grid:
            fold_scores = []
            for train, test in splits:
                model = clone(pipe).set_params(svc__C=c).fit(x[train], y[train])
                fold_scores.append(model.score(x[test], y[test]))
                bar.update()
            means.append(float(np.mean(fold_scores)))
            bar.set_postfix(best_cv_acc=f"{max(means):.3f}", refresh=False)
        best_C = C_grid[int(np.argmax(means))]  # the first of equal scores, as GridSearchCV
        best = clone(pipe).set_params(svc__C=best_C).fit(x, y)
        bar.update()
    scores = {float(c): m for c, m in zip(C_grid, means, strict=True)}
    return SvmFit(best, float(best_C), scores, time.perf_counter() - start)


def svm_to_linear(pipe: Pipeline) -> nn.Linear:
    """The fitted scaler + LinearSVC as one ``nn.Linear`` on raw features.

    w' = w / sigma and b' = b - w' . mu, so ``linear(x)`` equals ``decision_function(x)``. A binary
    SVM has one decision value f; we emit logits (-f/2, f/2) so argmax matches sklearn.
    """
    scaler: StandardScaler = pipe.named_steps["scale"]
    svc: LinearSVC = pipe.named_steps["svc"]
    w = svc.coef_ / scaler.scale_
    b = svc.intercept_ - w @ scaler.mean_
    if w.shape[0] == 1:
        w = np.vstack([-w / 2, w / 2])
        b = np.array([-b[0] / 2, b[0] / 2])
    linear = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(w).float())
        linear.bias.copy_(torch.from_numpy(b).float())
    return linear


def run(params, root: Path) -> dict:
    """The ``svm`` stage: C by stratified CV on train, stored as backbone + Linear; writes
    ``models/svm`` and ``metrics/svm.json``."""
    from transferlab.atomic import write_json
    from transferlab.backbones import load_backbone
    from transferlab.classifiers.base import Classifier, save_classifier
    from transferlab.classifiers.training import split_metrics
    from transferlab.layout import PARTS, labelled_features
    from transferlab.methods import METHODS

    method = METHODS["svm"]
    sp = params.svm
    data, classes = labelled_features(root)
    fit = fit_svm(
        data["x_train"],
        data["y_train"],
        C_grid=sp.C,
        cv=sp.cv,
        class_weight=sp.class_weight,
        max_iter=sp.max_iter,
        seed=params.split.seed,
    )
    svc = fit.pipeline.named_steps["svc"]
    preds = {
        p: fit.pipeline.predict(data[f"x_{p}"]) if len(data[f"y_{p}"]) else data[f"y_{p}"]
        for p in PARTS
    }
    metrics = split_metrics(preds, {p: data[f"y_{p}"] for p in PARTS}, classes)
    metrics.update(
        {
            "best_C": fit.best_C,
            "cv_scores": {str(c): s for c, s in fit.grid_scores.items()},
            "fit_seconds": round(fit.seconds, 4),
            "n_train": int(len(data["y_train"])),
            "trained_parameters": int(svc.coef_.size + svc.intercept_.size),
        }
    )
    backbone = load_backbone(params.features.backbone, params.features.pretrained)
    clf = Classifier(backbone, svm_to_linear(fit.pipeline), classes, method.name)
    save_classifier(clf, root / method.model_dir, pretrained=params.features.pretrained)
    write_json(root / method.metrics_file, metrics)
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | None)}
