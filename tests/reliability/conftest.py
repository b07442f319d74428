"""Collects the reliability cases' outcomes and prints them as a table at the end of the run."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

_CASES: dict[str, object] = {}
_OUTCOMES: dict[str, str] = {}


def pytest_collection_modifyitems(items):
    for item in items:
        marker = item.get_closest_marker("reliability")
        if marker:
            _CASES[item.nodeid] = marker.args[0]


def pytest_runtest_logreport(report):
    if report.nodeid not in _CASES:
        return
    relevant = report.when == "call" or report.failed or report.skipped
    if relevant and (report.nodeid not in _OUTCOMES or report.failed):
        _OUTCOMES[report.nodeid] = report.outcome


def pytest_terminal_summary(terminalreporter):
    if not _OUTCOMES:
        return
    tr = terminalreporter
    passed = sum(o == "passed" for o in _OUTCOMES.values())
    tr.section(f"reliability: {len(_OUTCOMES)} cases tried, {passed} passed")
    for nodeid, outcome in _OUTCOMES.items():
        case = _CASES[nodeid]
        tr.write_line(f"{outcome.upper():7} {case.id}: {case.fault}")
        tr.write_line(f"        -> {case.expected}; intact: {case.intact}")


# ------------------------------------------------------------------ helpers for the cases


def tree_digest(root: Path, *, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """path -> sha256 of every file under ``root`` (what 'nothing was touched' compares)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith(skip):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(root: Path) -> list[str]:
    """Temp files an interrupted write could leave behind."""
    return [p.relative_to(root).as_posix() for p in root.rglob("*.tmp")]


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-m", "transferlab.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def start_stage(stage: str, ws: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    """``transferlab <stage>`` in the background, its stderr (the logs) going to ``log``."""
    return subprocess.Popen(
        [sys.executable, "-m", "transferlab.cli", stage],
        cwd=ws,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),  # noqa: SIM115 - the child owns it
        env=env,
    )


def signal_and_wait(proc: subprocess.Popen, sig: int, log: Path, timeout: float = 180.0) -> int:
    """Send ``sig`` and wait for the exit code. The bound only catches a hang: leaving the
    interpreter of a large heap takes seconds, and much longer on a loaded machine."""
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(
            f"still running {timeout:.0f} s after signal {sig}:\n{log.read_text()[-3000:]}"
        ) from None


def wait_for(predicate, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the condition never came")
        time.sleep(0.05)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture
def workspace_copy(pipeline_workspace, tmp_path) -> Path:
    """A private copy of a finished workspace, safe to break."""
    dest = tmp_path / "ws"
    shutil.copytree(pipeline_workspace, dest, ignore=shutil.ignore_patterns("lock"))
    return dest
