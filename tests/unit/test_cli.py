import os
import subprocess
import sys

import pytest
import typer

from tests.conftest import REPO, tiny_params, write_workspace
from transferlab.cli import app


def _leaves(group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every runnable command, sub-commands included: ("full",), ("cache", "gc")..."""
    out = []
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):  # a group (typer's own click, not click.Group)
            out += _leaves(cmd, (*prefix, name))
        else:
            out.append((*prefix, name))
    return out


CLICK_APP = typer.main.get_command(app)
COMMANDS = _leaves(CLICK_APP)
NO_PARAMS = {("ui",), ("demo", "fgsm")}  # ui has --params; the demo reads no params file


def cli(*args, cwd, env=None):
    return subprocess.run(
        [sys.executable, "-m", "transferlab.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
    )


def test_the_top_level_help_has_examples(tmp_path):
    proc = cli("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Examples:" in proc.stdout and "transferlab run" in proc.stdout


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(command, tmp_path):
    proc = cli(*command, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--params" in proc.stdout or command in NO_PARAMS
    examples = proc.stdout.split("Examples:", 1)
    assert len(examples) == 2, f"no Examples: in `{' '.join(command)} --help`"
    invocation = "transferlab " + " ".join(command)
    assert any(line.strip().startswith(invocation) for line in examples[1].splitlines())
    assert "Reads:" in proc.stdout and "Writes:" in proc.stdout


def test_usage_errors_exit_2_with_clicks_message(tmp_path):
    proc = cli("full", "--no-such-option", cwd=tmp_path)
    assert proc.returncode == 2
    assert "No such option" in proc.stderr and "error: NoSuchOption" not in proc.stderr
    proc = cli(cwd=tmp_path)  # no command: the help, not an error line
    assert proc.returncode == 2 and "Usage" in proc.stdout
    assert "error:" not in proc.stderr


def test_stage_help_names_what_the_stage_reads_and_writes():
    from transferlab.stages import STAGES

    for name, stage in STAGES.items():
        text = CLICK_APP.commands[name].help
        reads, writes = text.split("Writes:")
        for path in stage.deps:
            assert path.rstrip("/") in reads, f"{name} --help does not say it reads {path}"
        for path in (*stage.outs, *stage.metrics, *stage.plots):
            assert path.rstrip("/") in writes, f"{name} --help does not say it writes {path}"
        for section in stage.params:
            assert section in reads.split("params:")[-1], f"{name}: params {section}"


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
    metrics["svm"] |= {"test_acc_ci_low": 0.6, "test_acc_ci_high": 0.98}
    rows = [
        {
            "model": "svm",
            "attack": "fgsm",
            "eps": 4 / 255,
            "robust_acc": 0.5,
            "robust_acc_ci_low": 0.3,
            "robust_acc_ci_high": 0.7,
        },
        {"model": "full", "attack": "fgsm", "eps": 4 / 255, "robust_acc": 0.25},
        {"model": "full", "attack": "fgsm", "eps": 8 / 255, "robust_acc": 0.0},
    ]
    table = results_table(metrics, rows, 4 / 255)
    assert [r["method"] for r in table] == ["svm", "full"]
    assert table[0]["train_seconds"] == 0.2 and table[1]["train_seconds"] == 9.0
    assert table[1]["robust_acc_fgsm"] == 0.25 and table[1]["trained_params"] == 99
    assert table[0]["regime"] == "5/class: few (< 25)"
    assert (table[0]["test_acc_ci_low"], table[0]["test_acc_ci_high"]) == (0.6, 0.98)
    assert (table[0]["robust_acc_fgsm_ci_low"], table[0]["robust_acc_fgsm_ci_high"]) == (0.3, 0.7)


@pytest.mark.slow
def test_quiet_mode_has_no_progress_bars(pipeline_workspace, tmp_path):
    import shutil

    out = {}
    for mode in ("loud", "quiet"):
        ws = tmp_path / mode
        shutil.copytree(pipeline_workspace, ws, ignore=shutil.ignore_patterns("lock", "cache"))
        # a line for every update: a log shows a step only once it has run LOG_INTERVAL seconds
        env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSFERLAB_PROGRESS_INTERVAL": "0"}
        out[mode] = cli("features", *(["-q"] if mode == "quiet" else []), cwd=ws, env=env)
        assert out[mode].returncode == 0, out[mode].stderr
    assert "img/s" in out["loud"].stderr and "INFO" in out["loud"].stderr
    assert "img/s" not in out["quiet"].stderr and "INFO" not in out["quiet"].stderr
    assert out["quiet"].stdout == ""


@pytest.mark.slow
def test_full_shows_rates_and_training_accuracy_and_quiet_hides_them(tmp_path, tiny_dataset):
    """A stage's bars on stderr: epochs, img/s with the running loss and accuracy; none with -q."""
    from transferlab.config import load_params
    from transferlab.stages import STAGES

    params = tiny_params(
        tiny_dataset,
        split={"val": 0.2},
        features={"pretrained": "none"},  # a random-weight backbone: the bars, not the accuracy
        full={"epochs": 2, "image_size": 32, "batch_size": 6, "augment": False},
    )
    ws = write_workspace(tmp_path / "ws", params)
    for stage in ("pull", "split"):
        STAGES[stage].run(load_params(ws / "params.yaml"), ws)
    # every update printed, so the test does not depend on how fast the batches run
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSFERLAB_PROGRESS_INTERVAL": "0"}
    loud = cli("full", cwd=ws, env=env)
    assert loud.returncode == 0, loud.stderr
    for shown in ("img/s", "epoch", "full epoch 1/2", "loss=", "acc=", "val_acc="):
        assert shown in loud.stderr, shown
    assert "INFO" in loud.stderr and "train acc" in loud.stderr  # the per-epoch log line
    quiet = cli("full", "--quiet", cwd=ws, env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert "img/s" not in quiet.stderr and "full epoch" not in quiet.stderr
    assert quiet.stdout == ""


def test_an_interrupt_wrapped_by_a_library_is_still_an_interruption():
    # A SIGTERM that lands inside an import or a library call can surface as, say, a
    # RuntimeError raised from our KeyboardInterrupt: it must exit 130, not 1.
    from transferlab.cli import _interrupted

    try:
        try:
            raise KeyboardInterrupt("stopped by signal 15")
        except KeyboardInterrupt as inner:
            raise RuntimeError("import failed") from inner
    except RuntimeError as wrapped:
        assert _interrupted(wrapped)
    assert not _interrupted(RuntimeError("a plain failure"))
