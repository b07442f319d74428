import subprocess
import sys

import pytest

from transferlab.cli import app

COMMANDS = [c.name or c.callback.__name__ for c in app.registered_commands]


def cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "transferlab.cli", *args], cwd=cwd, capture_output=True, text=True
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, tmp_path):
    proc = cli(command, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--params" in proc.stdout or command == "ui"


@pytest.mark.slow
def test_compare_and_status_read_the_last_runs(pipeline_workspace):
    proc = cli("compare", "--last", "3", cwd=pipeline_workspace)
    assert proc.returncode == 0, proc.stderr
    assert "svm" in proc.stdout and "test_acc" in proc.stdout
    proc = cli("status", cwd=pipeline_workspace)
    assert proc.returncode == 0, proc.stderr
    assert "feature cache" in proc.stdout and "svm" in proc.stdout


def test_a_failing_stage_is_one_line_with_exit_1(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  source: {kind: folder, path: /nope}\n")
    proc = cli("pull", cwd=tmp_path)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "/nope" in lines[0] and "--verbose" in lines[0]


def test_ladder_rows_carry_time_parameters_and_regime():
    from transferlab.report import results_table, training_regime

    assert training_regime(10, 5) == "2/class: few (< 25)"
    assert training_regime(500, 5) == "100/class: dozens-hundreds"
    assert training_regime(6000, 2) == "3000/class: 1000+"
    metrics = {
        "svm": {
            "test_acc": 0.9,
            "fit_seconds": 0.2,
            "trained_parameters": 10,
            "n_train": 10,
            "per_class_test_acc": {"a": 1.0, "b": 0.8},
        },
        "full": {
            "test_acc": 0.8,
            "train_seconds": 9.0,
            "trained_parameters": 99,
            "n_train": 10,
            "per_class_test_acc": {"a": 1.0, "b": 0.6},
        },
    }
    rows = [
        {"model": "svm", "attack": "fgsm", "eps": 4 / 255, "robust_acc": 0.5},
        {"model": "full", "attack": "fgsm", "eps": 4 / 255, "robust_acc": 0.25},
        {"model": "full", "attack": "fgsm", "eps": 8 / 255, "robust_acc": 0.0},
    ]
    table = results_table(metrics, rows, 4 / 255)
    assert [r["method"] for r in table] == ["svm", "full"]
    assert table[0]["train_seconds"] == 0.2 and table[1]["train_seconds"] == 9.0
    assert table[1]["robust_acc_fgsm"] == 0.25 and table[1]["trained_params"] == 99
    assert table[0]["regime"] == "5/class: few (< 25)"


@pytest.mark.slow
def test_quiet_mode_has_no_progress_bars(pipeline_workspace, tmp_path):
    import shutil

    out = {}
    for mode in ("loud", "quiet"):
        ws = tmp_path / mode
        shutil.copytree(pipeline_workspace, ws, ignore=shutil.ignore_patterns("lock", "cache"))
        out[mode] = cli("features", *(["-q"] if mode == "quiet" else []), cwd=ws)
        assert out[mode].returncode == 0, out[mode].stderr
    assert "img/s" in out["loud"].stderr and "INFO" in out["loud"].stderr
    assert "img/s" not in out["quiet"].stderr and "INFO" not in out["quiet"].stderr
    assert out["quiet"].stdout == ""
