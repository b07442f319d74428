"""A temporary Prefect API server for ``transferlab run`` that dies with its parent.

Prefect's own ephemeral mode starts ``uvicorn`` as a plain child process: a ``kill -9`` on the
parent leaves it running (adopted by PID 1, holding its port and database), and its start-up
wait counts 0.1 s per poll however long each poll really took, so on a busy machine "20 s"
became 50 to 87 s before it gave up. This module starts the same server (Prefect's
``create_app`` under uvicorn, UI off) itself:

- the child asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``, Linux), and
  also watches a pipe from the parent: end-of-file (the parent is gone, however it died) stops
  it, on every OS;
- start-up waits by the wall clock, ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` if set
  (else 180 s), and a timeout ends in one line saying what to do instead (a real server, or the
  stages without Prefect).

With ``PREFECT_API_URL`` set, nothing is started: the flow talks to that server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DEFAULT_STARTUP_TIMEOUT = 180.0
TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
PR_SET_PDEATHSIG = 1


class ServerStartFailed(RuntimeError):
    """The temporary Prefect server did not come up."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def startup_timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        return max(float(raw), 1.0) if raw else DEFAULT_STARTUP_TIMEOUT
    except ValueError:
        return DEFAULT_STARTUP_TIMEOUT


@contextmanager
def prefect_api(*, timeout: float | None = None) -> Iterator[str]:
    """Yield the Prefect API URL to run flows against: ``PREFECT_API_URL`` if set, else a
    temporary server started here (stopped on exit, and by the kernel if this process dies).

    Raises:
        ServerStartFailed: the server exited or did not answer within ``timeout`` seconds.
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    timeout = startup_timeout() if timeout is None else timeout
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        **get_current_settings().to_environment_variables(exclude_unset=True),
        # what Prefect's own ephemeral server sets: no UI, ephemeral-mode start-up
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "transferlab_flows.ephemeral", str(port), str(os.getpid())],
        stdin=subprocess.PIPE,  # the lifeline: closed by the kernel when this process dies
        env=env,
    )
    saved = os.environ.get("PREFECT_API_URL")
    try:
        _wait_healthy(proc, url, timeout)
        os.environ["PREFECT_API_URL"] = url  # for subprocess task runners (Dask workers)
        with temporary_settings({PREFECT_API_URL: url}):
            yield url
    finally:
        _drain_to(proc)
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved
        _stop(proc)


def _drain_to(proc: subprocess.Popen) -> None:
    """Send Prefect's queued logs and events while the server still listens: drained at
    interpreter exit instead, they print "Error logging to API" after a run that succeeded."""
    if proc.poll() is not None:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        # best effort: the run's outcome is already decided
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=10)


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartFailed(
                f"the temporary Prefect server exited with code {proc.returncode} while "
                f"starting; {_instead()}"
            )
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    _stop(proc)
    raise ServerStartFailed(
        f"the temporary Prefect server did not answer within {timeout:.0f} s (a busy machine?); "
        f"set {TIMEOUT_ENV} higher, or {_instead()}"
    )


def _instead() -> str:
    return (
        "start one (`prefect server start`) and set PREFECT_API_URL, or run the stages "
        "without Prefect: `dvc repro`, or `transferlab pull`, `split`, `features`, ... in order"
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------ the child


def _die_with_parent(parent: int) -> None:
    """SIGTERM from the kernel when the parent dies (Linux), and a thread that stops this
    process when the parent's end of stdin closes (any OS)."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(0)

    def watch() -> None:
        try:
            while sys.stdin.buffer.read(1):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down cleanly on SIGTERM
        time.sleep(10)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _serve(port: int, parent: int) -> None:
    _die_with_parent(parent)
    import uvicorn

    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host="127.0.0.1",
        port=port,
        log_level="error",
        lifespan="on",
    )


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
