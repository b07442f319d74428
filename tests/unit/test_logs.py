"""Logs a person can read outside a terminal (`make run > log`, CI, `dvc repro`): plain progress
lines named after their stage, Prefect lines naming their task, sentences for warnings, a
results table that fits 80 columns, and one line for an error that a retry cannot fix."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import pytest
from rich.console import Console

from tests.conftest import tiny_params, write_workspace


class _Log(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_progress_outside_a_terminal_is_plain_lines_named_after_the_stage(monkeypatch):
    from transferlab import progress as progress_mod

    log = _Log()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(progress_mod, "LOG_INTERVAL", 0.0)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with progress_mod.in_stage("features"):
        outer = progress_mod.progress(desc="epochs", unit="epoch", total=2, leave=True)
        for _ in range(2):
            for _ in progress_mod.progress(range(3), desc="batches", unit="batch"):
                pass
            progress_mod.show_fit(outer, 0.5, 0.9)
            outer.update()
        outer.close()
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines and all(line.startswith("features: ") for line in lines), lines
    assert "features: epochs: 100% 2/2" in lines[-1] and "loss=0.5" in lines[-1]


def test_prefect_records_name_their_task_run():
    from transferlab.cli import _LogFormat

    fmt = _LogFormat("%(levelname)s %(where)s: %(message)s")
    record = logging.LogRecord("prefect.task_runs", logging.INFO, "", 0, "Finished", (), None)
    record.task_run_name = "features"
    assert fmt.format(record) == "INFO prefect.task_runs [features]: Finished"
    plain = logging.LogRecord("transferlab.stages", logging.INFO, "", 0, "done", (), None)
    assert fmt.format(plain) == "INFO transferlab.stages: done"


def test_sanity_warnings_are_sentences():
    from transferlab.stages import _flag_sentence

    flag = {"level": "fail", "check": "robust <= clean", "model": "svm", "attack": "pgd"}
    assert _flag_sentence({**flag, "eps": 4 / 255}) == (
        "Sanity check failed: robust <= clean (svm, pgd, at eps 4/255)."
    )
    assert "{" not in _flag_sentence({"level": "warn", "check": "bf16 agrees", "x": 1})


def test_results_table_fits_80_columns_with_distinct_headers():
    from transferlab.cli import results_tables

    row = {
        "method": "full",
        "test_acc": 0.333,
        "val_acc": 0.5,
        "train_seconds": 29.78,
        "trained_params": 4655851,
        "regime": "6/class: few (< 25)",
        "robust_acc_fgsm": 0.167,
        "robust_acc_pgd": 0.1,
        "robust_acc_autoattack": 0.0,
        "robust_acc_hopskipjump": 0.0,
        "robust_acc_pgd_ci_low": 0.05,
        "robust_acc_pgd_ci_high": 0.2,
        "test_acc_ci_low": 0.2,
        "test_acc_ci_high": 0.47,
    }
    tables = results_tables([row, {**row, "method": "svm"}], report_eps=4 / 255)
    buf = io.StringIO()
    for table in tables:
        Console(file=buf, width=80).print(table)
    lines = buf.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    for table in tables:  # distinct within each table; every row one line (no wrapping)
        headers = [c.header for c in table.columns]
        assert len(set(headers)) == len(headers) and headers[0] == "method"
    assert sum(1 for line in lines if line.lstrip().startswith(("full", "svm"))) == 2 * len(tables)
    headers = [c.header for t in tables for c in t.columns]
    assert {"fgsm@4/255", "pgd@4/255", "autoattack@4/255", "hopskipjump@4/255"} <= set(headers)
    text = buf.getvalue()
    assert "fgsm@4/255" in text and "pgd@4/255" in text and "…" not in text
    # no room for intervals in 80 columns: the caption says where they are
    assert not any("ci" in h for h in headers) and "reports/index.html" in text


def test_deterministic_errors_are_not_retried():
    from transferlab.config import ParamsError
    from transferlab.data.sources import DataSourceError
    from transferlab_flows.tasks.stages import retry_transient

    class State:
        def __init__(self, data):
            self.data = data

    for exc in (DataSourceError("checksum mismatch"), ParamsError("bad"), FileNotFoundError()):
        assert retry_transient(None, None, State(exc)) is False
    assert retry_transient(None, None, State(ConnectionError("reset"))) is True


def _run(args, cwd):
    # a busy 2-core machine can take longer than Prefect's default 20 s to start its server
    env = {**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    return subprocess.run(
        [sys.executable, "-m", "transferlab.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("entry", [["pull"], pytest.param(["run"], marks=pytest.mark.slow)])
def test_a_missing_folder_is_one_line(entry, tmp_path, tiny_dataset):
    params = tiny_params(tiny_dataset)
    params["data"]["source"]["path"] = str(tmp_path / "missing")
    ws = write_workspace(tmp_path / "ws", params)
    proc = _run(entry, ws)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "missing" in line]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("error: DataSourceError: data.source.path ")
    assert "Traceback" not in proc.stderr
    assert "Retry" not in proc.stderr
