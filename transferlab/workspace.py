"""One run at a time per workspace: an advisory lock file that dies with its process."""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK = ".transferlab/lock"


class WorkspaceBusy(RuntimeError):
    """Another transferlab process holds this workspace."""


@contextmanager
def workspace_lock(root: Path, *, wait: float = 0.0) -> Iterator[None]:
    """Hold the workspace lock, waiting up to ``wait`` seconds for another run to finish.

    The kernel drops an flock when its process dies, so a killed run never leaves the workspace
    locked. Raises WorkspaceBusy naming the holder when the wait runs out.
    """
    path = Path(root) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _holder(path)
                    raise WorkspaceBusy(
                        f"another transferlab run ({holder}) is using the workspace {root}; "
                        "wait for it to finish, or run in another folder"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "since": time.time()}).encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        age = time.time() - float(info["since"])
        return f"pid {info['pid']}, running for {age:.0f} s"
    except (OSError, ValueError, KeyError):
        return "unknown process"
