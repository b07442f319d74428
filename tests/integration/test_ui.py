"""`transferlab ui`: refuses a busy port, prints links for the port it uses, and SIGTERM stops
every process it started."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import requests

from tests.conftest import tiny_params, write_workspace
from tests.integration.helpers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _ui(ws, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "transferlab.cli", "ui", "--port", str(port)],
        cwd=ws,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_busy_port_fails_in_one_line(tmp_path, tiny_dataset):
    ws = write_workspace(tmp_path / "ws", tiny_params(tiny_dataset))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _ui(ws, port)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.strip().splitlines() == [err.strip()]
    assert f"port {port} on 127.0.0.1 is busy" in err
    assert not (ws / "mlruns.db").exists()


def test_sigterm_stops_the_ui_and_every_child(tmp_path, tiny_dataset):
    ws = write_workspace(tmp_path / "ws", tiny_params(tiny_dataset))
    port = free_port()
    proc = _ui(ws, port)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        else:
            pytest.fail(f"the UI did not come up: {proc.stderr.read() if proc.poll() else ''}")
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children  # mlflow ui and its server worker
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert f"MLflow UI: http://127.0.0.1:{port}" in out
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert alive == []
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # the port is free again
