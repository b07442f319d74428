"""Progress bars for the long steps: tqdm on stderr, with a rate, hidden by ``--quiet``.

``--quiet`` sets ``TQDM_DISABLE`` (see ``transferlab.cli``). tqdm reads its ``TQDM_*`` defaults
once, when it is imported, and an explicit ``disable=`` argument wins over them; :func:`progress`
reads the variable when each bar is made, so quiet mode holds whatever the import order.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from tqdm.auto import tqdm

__all__ = [
    "Throttle",
    "in_stage",
    "logs_above_bars",
    "progress",
    "progress_disabled",
    "show_fit",
]


def progress_disabled() -> bool:
    """True under ``--quiet``: ``TQDM_DISABLE`` set to anything non-empty (as tqdm reads it)."""
    return bool(os.environ.get("TQDM_DISABLE"))


def progress(
    iterable: Iterable | None = None,
    *,
    desc: str,
    unit: str,
    total: float | None = None,
    leave: bool = False,
    disable: bool = False,
    **kwargs,
) -> tqdm:
    """A tqdm bar on stderr that shows its rate in ``unit``/s (img/s, epoch/s, batch/s...).

    Inner bars (a batch bar inside an epoch bar) keep ``leave=False`` so a finished step leaves
    no line behind. Outside a terminal (``dvc repro``, CI, ``make run > log``) a bar is a plain
    line every ``LOG_INTERVAL`` seconds, named after the stage, with no carriage returns or
    cursor codes (``_LineWriter``); ``--quiet`` turns bars off altogether.

    Args:
        iterable: what to iterate over, or None to ``update()`` by hand.
        desc: what the step does (shown first).
        unit: what one step of the bar counts.
        total: steps expected (defaults to ``len(iterable)``).
        leave: keep the finished bar on screen.
        disable: no bar for this call (it is off under ``--quiet`` anyway).
        **kwargs: passed to tqdm (``unit_scale``, ``initial``, ``postfix``...).
    """
    stage = _STAGE.get()
    if stage and not desc.startswith(stage):
        desc = f"{stage}: {desc}"
    if sys.stderr.isatty():
        looks = {"file": sys.stderr, "dynamic_ncols": True}
    else:
        interval = log_interval()
        looks = {
            "file": _LineWriter(sys.stderr),
            "mininterval": interval,
            "delay": interval,  # steps shorter than that leave no line at all
            "bar_format": LOG_FORMAT,
        }
    return tqdm(
        iterable,
        desc=desc,
        unit=unit,
        total=total,
        leave=leave,
        disable=disable or progress_disabled(),
        **looks,
        **kwargs,
    )


# Outside a terminal: one line per bar at most every LOG_INTERVAL seconds, no bar drawing.
LOG_INTERVAL = 5.0
INTERVAL_ENV = "TRANSFERLAB_PROGRESS_INTERVAL"


def log_interval() -> float:
    """Seconds between progress lines outside a terminal: ``$TRANSFERLAB_PROGRESS_INTERVAL``
    (0: every update; more for quieter CI logs), else ``LOG_INTERVAL``."""
    value = os.environ.get(INTERVAL_ENV, "")
    try:
        seconds = float(value) if value else LOG_INTERVAL
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV}={value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{INTERVAL_ENV}={value!r} must be a finite number of seconds >= 0")
    return seconds


LOG_FORMAT = (
    "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
)
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_STAGE: ContextVar[str | None] = ContextVar("transferlab_stage", default=None)


@contextmanager
def in_stage(name: str) -> Iterator[None]:
    """Bars made meanwhile (in this thread or context) start with ``name:``, so a log with
    several stages says which one each progress line is about."""
    token = _STAGE.set(name)
    try:
        yield
    finally:
        _STAGE.reset(token)


class _LineWriter:
    """A file for tqdm when stderr is a log, not a terminal: each redraw (tqdm writes
    ``\\r`` + the bar) becomes one line; cursor moves, blank redraws and repeats are dropped."""

    def __init__(self, stream):
        self._stream = stream
        self._last = ""

    def write(self, text: str) -> int:
        for piece in re.split(r"[\r\n]", _ESCAPES.sub("", text)):
            line = piece.strip()
            # a redraw with the same count but a later clock (tqdm's monitor thread) is no news
            key = re.sub(r"\[.*\]", "", line)
            if line and key != self._last:
                self._stream.write(line + "\n")
                self._last = key
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


def show_fit(bar: tqdm, loss: float, acc: float, val_acc: float | None = None) -> None:
    """Put a training loop's figures after ``bar``: loss, training accuracy (the recipe's
    overfitting signal) and, when there is one, validation accuracy. Drawn at the bar's next
    update."""
    figures = {"loss": f"{loss:.4f}", "acc": f"{acc:.3f}"}
    if val_acc is not None:
        figures["val_acc"] = f"{val_acc:.3f}"
    bar.set_postfix(figures, refresh=False)


class Throttle:
    """True at most once per ``seconds``: for bar postfixes that need a device sync (``.item()``
    on a GPU loss), so a training loop syncs about once a second instead of every batch.

    Always False for a disabled bar, so quiet runs never sync for it.
    """

    def __init__(self, bar: tqdm, seconds: float = 0.5):
        self._off = bool(getattr(bar, "disable", False))
        self._seconds = seconds
        self._last = -float("inf")

    def __call__(self) -> bool:
        if self._off:
            return False
        now = time.monotonic()
        if now - self._last < self._seconds:
            return False
        self._last = now
        return True


@contextmanager
def logs_above_bars() -> Iterator[None]:
    """Console log lines go through ``tqdm.write`` meanwhile: printed above the open bars
    instead of into the middle of one (what the CLI wraps each command in)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(tqdm_class=tqdm):
        yield
