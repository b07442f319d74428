import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, tiny_params, write_workspace
from transferlab.experiments.learning_curve import (
    markdown_table,
    per_class_indices,
    read_idx,
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


def test_subsets_are_per_class_and_nested_in_the_pool():
    y = np.repeat(np.arange(4), 10)
    idx = per_class_indices(y, 3, np.random.default_rng(0))
    assert np.bincount(y[idx]).tolist() == [3, 3, 3, 3]
    assert len(per_class_indices(y, 50, np.random.default_rng(0))) == 40  # capped by the class


def test_summary_has_mean_std_and_the_winner():
    rows = [
        {"method": m, "n_per_class": n, "seed": s, "test_acc": acc, "seconds": 1.0}
        for m, n, s, acc in [
            ("svm", 1, 0, 0.5),
            ("svm", 1, 1, 0.7),
            ("top", 1, 0, 0.4),
            ("top", 1, 1, 0.4),
            ("full", 1, 0, 0.1),
            ("full", 1, 1, 0.3),
        ]
    ]
    (s,) = summarise(rows)
    assert s["svm_mean"] == pytest.approx(0.6) and s["svm_std"] == pytest.approx(0.1)
    assert s["best"] == "svm"
    assert "| 1 | 0.600 ± 0.100 |" in markdown_table([s])


@pytest.mark.slow
def test_cli_runs_all_three_methods_and_logs_to_mlflow(tmp_path, tiny_dataset):
    import mlflow

    idx = fake_fashion(tmp_path / "fmnist")
    params = tiny_params(
        tiny_dataset,
        learning_curve={
            "idx_dir": str(idx),
            "n_per_class": [1, 3],
            "seeds": [0],
            "test_per_class": 2,
            "image_size": 32,
            "top_epochs": 5,
            "full_epochs": 1,
            "full_min_steps": 1,
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
    assert len(lines) == 1 + 3 * 2  # methods x N
    assert (ws / "lc/curve.png").stat().st_size > 5000
    table = (ws / "lc/summary.md").read_text()
    assert "transferlab experiment learning-curve" in table and "| 3 |" in table
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
