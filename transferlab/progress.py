"""Progress bars for the long steps: tqdm on stderr, with a rate, hidden by ``--quiet``.

``--quiet`` sets ``TQDM_DISABLE`` (see ``transferlab.cli``). tqdm reads its ``TQDM_*`` defaults
once, when it is imported, and an explicit ``disable=`` argument wins over them; :func:`progress`
reads the variable when each bar is made, so quiet mode holds whatever the import order.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

__all__ = ["Throttle", "logs_above_bars", "progress", "progress_disabled", "show_fit"]


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
    no line behind. Bars show whether or not stderr is a terminal (``dvc repro`` and CI logs
    included); ``--quiet`` is the switch for logs.

    Args:
        iterable: what to iterate over, or None to ``update()`` by hand.
        desc: what the step does (shown first).
        unit: what one step of the bar counts.
        total: steps expected (defaults to ``len(iterable)``).
        leave: keep the finished bar on screen.
        disable: no bar for this call (it is off under ``--quiet`` anyway).
        **kwargs: passed to tqdm (``unit_scale``, ``initial``, ``postfix``...).
    """
    return tqdm(
        iterable,
        desc=desc,
        unit=unit,
        total=total,
        leave=leave,
        file=sys.stderr,
        disable=disable or progress_disabled(),
        dynamic_ncols=True,
        **kwargs,
    )


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
