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

    w' = w / sigma and b' = b - w' . mu, so ``linear(x)`` equals ``decision_function(x)`` (for
    more than two classes; see :func:`_decision_linear` for two).
    """
    scaler: StandardScaler = pipe.named_steps["scale"]
    svc: LinearSVC = pipe.named_steps["svc"]
    w = svc.coef_ / scaler.scale_
    return _decision_linear(w, svc.intercept_ - w @ scaler.mean_)


def _decision_linear(w: np.ndarray, b: np.ndarray) -> nn.Linear:
    """A linear SVM's decision function, (K, D) weights ``w`` and (K,) biases ``b``, as an
    ``nn.Linear`` whose logits' argmax matches its predictions.

    A binary SVM has one decision value f (K = 1); we emit logits (-f/2, f/2)."""
    if w.shape[0] == 1:
        w = np.vstack([-w / 2, w / 2])
        b = np.array([-b[0] / 2, b[0] / 2])
    linear = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(w).float())
        linear.bias.copy_(torch.from_numpy(b).float())
    return linear


def run(params, root: Path) -> dict:
    """The ``svm`` stage: the features under ``features.preprocess`` (fitted on train), C chosen
    on the validation split (stratified CV on train when there is none), stored as backbone +
    transform + Linear; writes ``models/svm`` and ``metrics/svm.json``."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from transferlab.atomic import write_json
    from transferlab.backbones import load_backbone
    from transferlab.classifiers.base import Classifier, save_classifier
    from transferlab.classifiers.prep import apply_prep, choose_prep, fit_prep, wrap
    from transferlab.classifiers.training import split_metrics
    from transferlab.layout import PARTS, labelled_features
    from transferlab.methods import METHODS

    method = METHODS["svm"]
    sp = params.svm
    seed = params.split.seed
    start = time.perf_counter()
    data, classes = labelled_features(root)
    kind, probe = choose_prep(
        params.features.preprocess, *(data[k] for k in ("x_train", "y_train", "x_val", "y_val"))
    )
    prep = fit_prep(kind, data["x_train"])
    x = {p: apply_prep(prep, data[f"x_{p}"]) for p in PARTS}
    y = {p: data[f"y_{p}"] for p in PARTS}

    def svc(c: float) -> LinearSVC:
        return LinearSVC(
            C=c, dual="auto", class_weight=sp.class_weight, max_iter=sp.max_iter, random_state=seed
        )

    # C on the validation split; with none held out, by stratified CV on train
    on = "val" if len(y["val"]) else "cv"
    folds = min(sp.cv, int(np.bincount(y["train"]).min()))
    splits = (
        list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(x["train"], y["train"]))
        if on == "cv" and folds >= 2
        else []
    )

    def score(c: float) -> float | None:
        pairs = splits or ([(slice(None), None)] if on == "val" else [])
        accs = []
        for tr, te in pairs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                m = svc(c).fit(x["train"][tr], y["train"][tr])
            xs, ys = (x["val"], y["val"]) if te is None else (x["train"][te], y["train"][te])
            accs.append(float((m.predict(xs) == ys).mean()))
        return float(np.mean(accs)) if accs else None

    trials = []
    with progress(desc=f"svm: C on {on}", unit="trial", total=len(sp.C)) as bar:
        for trial in sp.trials():
            trials.append({**trial, f"{on}_acc": score(trial["C"])})
            bar.update()
    scored = [t for t in trials if t[f"{on}_acc"] is not None]
    # the first of equal scores; nothing to score on: the first C
    best_C = max(scored, key=lambda t: t[f"{on}_acc"])["C"] if scored else sp.C[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model = svc(best_C).fit(x["train"], y["train"])
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    preds = {p: model.predict(x[p]) if len(y[p]) else y[p] for p in PARTS}
    metrics = split_metrics(preds, y, classes)
    metrics.update(
        {
            "best_C": float(best_C),
            "selection": {"on": on, "chosen": {"C": float(best_C)}, "trials": trials},
            "preprocess": {
                "key": params.features.preprocess,
                "chosen": kind,
                "probe_val_acc": probe,
            },
            "train_seconds": round(time.perf_counter() - start, 4),
            "n_train": int(len(y["train"])),
            "trained_parameters": int(model.coef_.size + model.intercept_.size),
            "sanity": {
                "under_trained": not converged,
                "why": ""
                if converged
                else f"liblinear stopped at max_iter={sp.max_iter} before converging; raise "
                "svm.max_iter",
            },
        }
    )
    backbone = load_backbone(params.features.backbone, params.features.pretrained)
    clf = Classifier(
        backbone, wrap(prep, _decision_linear(model.coef_, model.intercept_)), classes, method.name
    )
    save_classifier(clf, root / method.model_dir, pretrained=params.features.pretrained)
    write_json(root / method.metrics_file, metrics)
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | None)}
