"""Run a server command as its own process group, and stop the whole group when we stop.

``mlflow ui`` starts a server that starts workers; stopping only the first process (what a plain
``subprocess.call`` does on Ctrl-C or SIGTERM) leaves the rest running and holding the port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess


class PortBusy(RuntimeError):
    """Something already listens on the address."""


def check_port_free(host: str, port: int) -> None:
    """Raise ``PortBusy`` (a one-line message saying what to do) if ``host:port`` is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise PortBusy(
                f"port {port} on {host} is busy ({exc.strerror}); pick another with --port, "
                f"or stop what is listening there"
            ) from None


def run_group(cmd: list[str], *, env: dict[str, str] | None = None, grace: float = 10.0) -> int:
    """Run ``cmd`` in a new session (its own process group) until it exits or we are stopped.

    On KeyboardInterrupt (Ctrl-C, or SIGTERM turned into one by the CLI) every process of the
    group gets SIGTERM, then SIGKILL after ``grace`` seconds; the interrupt is then re-raised.
    Returns the command's exit code.
    """
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        return proc.wait()
    except BaseException:
        stop_group(proc, grace=grace)
        raise
    finally:
        _kill_group(proc.pid, signal.SIGKILL)  # stragglers of a command that exited by itself


def stop_group(proc: subprocess.Popen, *, grace: float = 10.0) -> None:
    """SIGTERM the process group of ``proc``; SIGKILL it if the leader outlives ``grace``."""
    _kill_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid, signal.SIGKILL)
        proc.wait()


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
