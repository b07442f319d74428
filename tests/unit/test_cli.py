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
