"""One writer at a time per workspace: advisory locks that die with their process.

Every transferlab writer (each stage command, ``transferlab run``) holds two flocks for as long
as it writes:

- ``.transferlab/lock``: transferlab's own, naming its holder (pid, age) in the error.
- ``.dvc/tmp/lock`` (in a DVC repository): the very lock DVC's commands take (zc.lockfile, an
  flock) before they touch outputs: ``dvc repro`` deleting outs or restoring them from its run
  cache, ``dvc checkout``, ``dvc pull``, ``dvc exp apply``. While transferlab holds it they stop
  with DVC's "Unable to acquire lock" (or wait, with ``--wait-for-lock``) instead of rewriting
  ``models/`` underneath a running stage. DVC releases this lock while it runs a stage's
  command, so the ``transferlab <stage>`` that ``dvc repro`` starts takes it as usual.

What it cannot cover: tools that write outputs without DVC's lock (``git checkout`` of tracked
files, a hand ``rm``), and DVC versions that lock elsewhere. docs/reliability.md lists this.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

LOCK = ".transferlab/lock"
DVC_LOCK = ".dvc/tmp/lock"


class WorkspaceBusy(RuntimeError):
    """Another transferlab process (or a DVC command) holds this workspace."""


def _flock(path: Path, wait: float, busy: callable) -> int:
    """An exclusive flock on ``path`` (created if missing), waiting up to ``wait`` seconds;
    returns the open fd (closing it releases the lock). ``busy()`` builds the error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise busy() from None
            time.sleep(0.2)


@contextmanager
def workspace_lock(root: Path, *, wait: float = 0.0) -> Iterator[None]:
    """Hold the workspace lock (and DVC's, in a DVC repository), waiting up to ``wait`` seconds
    for another run to finish.

    The kernel drops an flock when its process dies, so a killed run never leaves the workspace
    locked. Raises WorkspaceBusy naming the holder when the wait runs out.
    """
    root = Path(root)
    path = root / LOCK
    with ExitStack() as stack:
        fd = _flock(
            path,
            wait,
            lambda: WorkspaceBusy(
                f"another transferlab run ({_holder(path)}) is using the workspace {root}; "
                "wait for it to finish, or run in another folder"
            ),
        )
        stack.callback(os.close, fd)
        if (root / ".dvc").is_dir():
            dvc_fd = _flock(
                root / DVC_LOCK,
                wait,
                lambda: WorkspaceBusy(
                    f"a DVC command (dvc repro, checkout, pull...) is using the workspace {root} "
                    f"({root / DVC_LOCK} is locked); wait for it to finish"
                ),
            )
            stack.callback(os.close, dvc_fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "since": time.time()}).encode())
        yield


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        age = time.time() - float(info["since"])
        return f"pid {info['pid']}, running for {age:.0f} s"
    except (OSError, ValueError, KeyError):
        return "unknown process"
