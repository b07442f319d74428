"""The budget experiment: the test set never enters the pool, and the summary's figures."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from transferlab.active import experiment as ex
from transferlab.active.new_class import extend_head
from transferlab.config import Params


def _dataset(n_pool=60, n_test=30, c=3, seed=0):
    rng = np.random.default_rng(seed)
    y_pool, y_test = np.arange(n_pool) % c, np.arange(n_test) % c
    x_pool = rng.normal(size=(n_pool, 8)) + y_pool[:, None]
    x_test = rng.normal(size=(n_test, 8)) + y_test[:, None]
    # column 0 marks where a row comes from: +100 pool, -100 test
    x_pool[:, 0], x_test[:, 0] = 100.0, -100.0
    return ex.Dataset(
        "synthetic",
        x_pool.astype(np.float32),
        y_pool,
        x_test.astype(np.float32),
        y_test,
        ("a", "b", "c"),
    )


@pytest.mark.parametrize("strategy", ["margin", "kcenter", "badge"])
@pytest.mark.parametrize("learner", ["svm", "top"])
def test_test_set_never_enters_the_pool(monkeypatch, strategy, learner):
    seen_train, seen_select = [], []
    fit, sel = ex.fit_predict, ex.select

    def spy_fit(learner, x, y, queries, **kw):
        seen_train.append(x[:, 0].copy())
        return fit(learner, x, y, queries, **kw)

    def spy_select(strategy, *, features, labelled, **kw):
        seen_select.append(np.r_[features[:, 0], labelled[:, 0]])
        return sel(strategy, features=features, labelled=labelled, **kw)

    monkeypatch.setattr(ex, "fit_predict", spy_fit)
    monkeypatch.setattr(ex, "select", spy_select)
    params = Params()
    rows = ex.simulate(
        _dataset(),
        learner=learner,
        strategy=strategy,
        seed=0,
        seed_per_class=1,
        batch=10,
        budget=33,
        svm=params.svm.model_copy(update={"C": (0.1,)}),
        top=params.top.model_copy(update={"epochs": 3}),
    )
    assert [r["labels"] for r in rows] == [3, 13, 23, 33]
    assert all(r["n_test"] == 30 for r in rows)
    assert seen_train and all((x == 100.0).all() for x in seen_train)
    assert seen_select and all((x == 100.0).all() for x in seen_select)


def test_photos_pool_is_train_and_val_only(tmp_path):
    paths = [f"images/{c}/{i}.png" for c in "ab" for i in range(6)]
    split = ["test", "val", "train", "train", "train", "test"] * 2
    feats = np.array([[-1.0 if s == "test" else 1.0, i] for i, s in enumerate(split)])
    (tmp_path / "features").mkdir()
    np.savez(
        tmp_path / "features/features.npz",
        features=feats.astype(np.float32),
        path=np.array(paths),
        label=np.array([p.split("/")[1] for p in paths]),
        sha256=np.array([str(i) for i in range(12)]),
    )
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data/split.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "sha256", "split"])
        for i, (p, s) in enumerate(zip(paths, split, strict=True)):
            w.writerow([p, p.split("/")[1], str(i), s])
    ds = ex.photos_dataset(tmp_path)
    assert len(ds.y_pool) == 8 and len(ds.y_test) == 4
    assert (ds.x_pool[:, 0] == 1.0).all() and (ds.x_test[:, 0] == -1.0).all()


def test_summary_auc_and_labels_to_target():
    rows = []
    for strategy, accs in (("random", [0.5, 0.6, 0.7]), ("margin", [0.5, 0.7, 0.8])):
        for seed in (0, 1):
            for labels, acc in zip((10, 20, 30), accs, strict=True):
                rows.append(
                    {
                        "dataset": "d",
                        "learner": "svm",
                        "strategy": strategy,
                        "seed": seed,
                        "labels": labels,
                        "correct": round(acc * 100),
                        "n_test": 100,
                        "test_acc": acc,
                    }
                )
    out = ex.summarise(rows, {("d", "svm"): 0.8}, 0.95)
    by = {s["strategy"]: s for s in out["strategies"]}
    assert by["random"]["auc_mean"] == pytest.approx(0.6)
    assert by["margin"]["auc_mean"] == pytest.approx(0.675)
    assert (
        by["margin"]["labels_to_95pct_full"] == 30 and by["random"]["labels_to_95pct_full"] is None
    )
    assert by["margin"]["labels_to_match_random_final"] == 20
    assert by["margin"]["fraction_of_random_labels"] == pytest.approx(20 / 30)
    point = next(p for p in out["curve"] if p["strategy"] == "margin" and p["labels"] == 20)
    assert point["wilson_low"] < 0.7 < point["wilson_high"]


def test_extend_head_keeps_old_rows_and_points_the_new_one_at_the_mean():
    head = torch.nn.Linear(4, 2)
    mean = torch.tensor([0.0, 3.0, 0.0, 4.0])
    new = extend_head(head, mean)
    assert new.weight.shape == (3, 4)
    assert torch.equal(new.weight[:2], head.weight) and torch.equal(new.bias[:2], head.bias)
    cos = torch.nn.functional.cosine_similarity(new.weight[2].detach(), mean, dim=0)
    assert cos.item() == pytest.approx(1.0)
    assert new.weight[2].norm().item() == pytest.approx(
        head.weight.norm(dim=1).mean().item(), rel=1e-5
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["extend", "retrain"])
def test_new_class_fine_tuned_methods_extend_or_retrain(pipeline_workspace, tmp_path, mode):
    # full and adv (trains_backbone in the method registry) either extend their stored head or
    # run their own stage again on the grown data, as new_class.fine_tuned chooses
    import json
    import shutil
    from pathlib import Path

    from tests.conftest import draw_image
    from transferlab.active.new_class import new_class_experiment
    from transferlab.config import load_params

    ws = tmp_path / "ws"
    for part in ("data", "features", "models"):  # a copy: the shared workspace stays as it is
        shutil.copytree(pipeline_workspace / part, ws / part, symlinks=True)
    shutil.copy(pipeline_workspace / "params.yaml", ws / "params.yaml")
    new = tmp_path / "dots"
    new.mkdir()
    for i in range(4):
        draw_image("circles", seed=9300 + i, size=64).save(new / f"d{i}.png")
    params = load_params(ws / "params.yaml")
    # retrain lists adv alone: its stage starts from models/full, so full retrains first (one
    # trial each: the stages' own trial search is not what this checks, and it doubles the time)
    learners = ("adv",) if mode == "retrain" else ("svm", "full", "adv")
    one_trial = {m: getattr(params, m).model_copy(update={"search": {}}) for m in ("full", "adv")}
    nc = params.new_class.model_copy(
        update={
            "name": "dots",
            "path": new,
            "counts": (2,),
            "seeds": (0,),
            "test_max": 2,
            "learners": learners,
            "fine_tuned": mode,
            "extend_epochs": 2,
            "out_dir": Path("nc"),
        }
    )
    new_class_experiment(params.model_copy(update={"new_class": nc, **one_trial}), ws)

    with open(ws / "nc/runs.csv", newline="") as f:
        runs = list(csv.DictReader(f))
    n_test = sum(
        1 for line in (ws / "data/split.csv").read_text().splitlines() if line.endswith(",test")
    )
    assert {r["learner"] for r in runs} == set(learners)
    assert all(int(r["old_n"]) == n_test and int(r["new_n"]) == 2 for r in runs)
    notes = json.loads((ws / "nc/summary.json").read_text())["fine_tuned_notes"]
    expected = "retrained from scratch" if mode == "retrain" else "head extended"
    assert set(notes) == set(learners) - {"svm"}
    assert all(v.startswith(expected) for v in notes.values())
    assert not list((ws / ".transferlab").glob("new-class-*"))  # scratch workspaces removed
