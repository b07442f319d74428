import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, tiny_params, write_workspace
from transferlab.experiments.learning_curve import (
    lecture_verdicts,
    markdown_table,
    pairs_table,
    per_class_indices,
    read_idx,
    repeat_to,
    seed_split,
    summarise,
)


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def fake_fashion(folder: Path, n_train: int = 60, n_test: int = 30) -> Path:
    """IDX files like Debian's dataset-fashion-mnist: 10 classes, a bright band per class."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % 10
        x = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(y):
            x[i, 2 * c : 2 * c + 6] = 250
        write_idx(folder / f"{part}-images-idx3-ubyte.gz", x)
        write_idx(folder / f"{part}-labels-idx1-ubyte.gz", y)
    return folder


def test_read_idx_round_trips_and_rejects_other_files(tmp_path):
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(np.uint8)
    write_idx(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "b").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="IDX"):
        read_idx(tmp_path / "b")


def test_per_class_indices_are_per_class_and_capped():
    y = np.repeat(np.arange(4), 10)
    idx = per_class_indices(y, 3, np.random.default_rng(0))
    assert np.bincount(y[idx]).tolist() == [3, 3, 3, 3]
    assert len(per_class_indices(y, 50, np.random.default_rng(0))) == 40  # capped by the class


def test_subsets_are_nested_disjoint_from_val_and_differ_between_seeds_at_the_largest_n():
    y = np.repeat(np.arange(3), 30)
    ns = (1, 5, 20)
    a, b = seed_split(y, ns, 4, seed=0), seed_split(y, ns, 4, seed=1)
    for split in (a, b):
        assert np.bincount(y[split.val]).tolist() == [4, 4, 4]
        for small, big in zip(ns, ns[1:], strict=False):
            assert set(split.train[small]) <= set(split.train[big])
        assert not set(split.train[20]) & set(split.val)
        assert np.bincount(y[split.train[20]]).tolist() == [20, 20, 20]
    # the pool (30/class) is larger than val + max N (24): the largest subsets differ
    assert set(a.train[20]) != set(b.train[20])
    with pytest.raises(ValueError, match="pool_per_class"):
        seed_split(y, (27,), 4, seed=0)


def test_tiny_training_sets_are_repeated_to_an_epoch():
    assert len(repeat_to(10, 128)) == 130 and set(repeat_to(10, 128)) == set(range(10))
    assert len(repeat_to(500, 128)) == 500


def _rows_and_outcomes(accs: dict[str, list[float]], n_test: int = 1000):
    """Runs at N=1 with per-seed accuracies; outcomes with exactly that many right images."""
    rows, outcomes = [], {}
    for m, per_seed in accs.items():
        for s, acc in enumerate(per_seed):
            k = round(acc * n_test)
            rows.append(
                {"method": m, "n_per_class": 1, "seed": s, "n_test": n_test, "test_acc": k / n_test}
                | {"seconds": 1.0}
            )
            outcomes[(m, 1, s)] = np.arange(n_test) < k
    return rows, outcomes


def test_summary_has_intervals_with_ddof1_and_the_winner():
    rows, outcomes = _rows_and_outcomes(
        {"svm": [0.5, 0.7], "top": [0.4, 0.4], "full": [0.1, 0.3]}, n_test=100
    )
    (s,) = summarise(rows, outcomes)
    assert s["svm_mean"] == pytest.approx(0.6)
    half = 1.96 * (0.6 * 0.4 / 100 + np.var([0.5, 0.7], ddof=1) / 2) ** 0.5
    assert s["svm_ci_high"] - 0.6 == pytest.approx(half, rel=1e-3)
    # identical seeds still get the binomial width of the test set, never a zero-width bar
    assert s["top_ci_high"] > s["top_ci_low"]
    assert s["best"] == "svm"
    assert "| 1 | 0.600 [" in markdown_table([s])
    pairs = {(p["a"], p["b"]): p["verdict"] for p in s["pairs"]}
    assert pairs[("svm", "full")] == "win"
    assert "svm - full" in pairs_table([s])


def test_lecture_verdicts_say_where_the_ordering_holds_and_where_not():
    rows, outcomes = _rows_and_outcomes(
        {"svm": [0.8, 0.8, 0.8], "top": [0.8, 0.8, 0.8], "full": [0.5, 0.5, 0.5]}
    )
    (v,) = lecture_verdicts(summarise(rows, outcomes), ("svm", "top", "full"))
    assert v["expected"] == "svm" and v["verdict"].startswith("tie")
    rows, outcomes = _rows_and_outcomes({"svm": [0.5] * 3, "top": [0.8] * 3, "full": [0.4] * 3})
    (v,) = lecture_verdicts(summarise(rows, outcomes), ("svm", "top", "full"))
    assert v["verdict"] == "does not hold" and "loss vs top" in v["detail"]
    rows, outcomes = _rows_and_outcomes({"svm": [0.9] * 3, "top": [0.8] * 3})
    (v,) = lecture_verdicts(summarise(rows, outcomes), ("svm", "top", "full"))
    assert v["verdict"] == "holds"


@pytest.mark.slow
def test_cli_runs_all_three_methods_and_logs_to_mlflow(tmp_path, tiny_dataset):
    import mlflow

    idx = fake_fashion(tmp_path / "fmnist")
    params = tiny_params(
        tiny_dataset,
        learning_curve={
            "idx_dir": str(idx),
            "n_per_class": [1, 3],
            "backbone_n_per_class": [1],
            "seeds": [0, 1],
            "test_per_class": 2,
            "val_per_class": 1,
            "pool_per_class": 5,
            "image_size": 32,
            "min_epoch_images": 8,
            "out_dir": "lc",
        },
    )
    ws = write_workspace(tmp_path / "ws", params)
    out = subprocess.run(
        [sys.executable, "-m", "transferlab.cli", "experiment", "learning-curve", "-q"],
        cwd=ws,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent)},
    )
    assert out.returncode == 0, out.stderr
    lines = (ws / "lc/runs.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * (2 + 2 + 1)  # seeds x (svm, top at N=1,3; full at N=1)
    assert (ws / "lc/curve.png").stat().st_size > 5000
    table = (ws / "lc/summary.md").read_text()
    assert "transferlab experiment learning-curve" in table and "| 3 |" in table
    assert "Does the lecture's ordering hold?" in table
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlruns.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == [
        "learning-curve",
        "learning-curve-full",
        "learning-curve-svm",
        "learning-curve-top",
    ]
    top = next(r for r in runs if r.info.run_name == "learning-curve-top")
    hist = client.get_metric_history(top.info.run_id, "test_acc_mean")
    assert sorted(m.step for m in hist) == [1, 3]
    assert len(client.get_metric_history(top.info.run_id, "test_acc_ci_low")) == 2


def test_method_overrides_apply_to_the_experiment_only_and_typos_fail_early():
    from transferlab.config import LearningCurveParams, Params
    from transferlab.experiments.learning_curve import with_overrides

    params = Params(
        learning_curve={"method_overrides": {"svm": {"C": [0.5]}, "full": {"epochs": 9}}}
    )
    effective = with_overrides(params)
    assert effective.svm.C == (0.5,) and effective.full.epochs == 9
    assert params.svm.C != (0.5,)  # the pipeline's sections are untouched
    with pytest.raises(ValueError, match="unknown method 'svn'"):
        LearningCurveParams(method_overrides={"svn": {}})
    with pytest.raises(ValueError, match="Extra inputs"):
        LearningCurveParams(method_overrides={"svm": {"CC": 1}})


def test_outputs_load_back_for_a_rewrite_or_a_merge(tmp_path):
    from transferlab.config import LearningCurveParams
    from transferlab.experiments.learning_curve import load_outputs, write_outputs

    rows, outcomes = _rows_and_outcomes({"svm": [0.5, 0.7], "top": [0.4, 0.6]}, n_test=50)
    for r in rows:
        r |= {"best_C": 0.001} if r["method"] == "svm" else {"best_epoch": 3}
    lc = LearningCurveParams(out_dir=tmp_path / "lc", methods=("svm", "top"), seeds=(0, 1))
    write_outputs(rows, outcomes, lc, tmp_path, "cmd")
    back_rows, back_outcomes = load_outputs(tmp_path / "lc")
    assert back_rows == rows
    assert back_outcomes.keys() == outcomes.keys()
    assert all((back_outcomes[k] == v).all() for k, v in outcomes.items())
