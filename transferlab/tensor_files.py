"""The one way transferlab reads and writes torch files: tensors only, never pickled code.

A ``.pt`` file is a pickle. ``torch.load(weights_only=False)`` on a file someone else could
write (a checkpoint in the workspace, a model under ``mlartifacts/``, a ``file:`` weights path)
runs whatever code that pickle names. :func:`load` only ever uses torch's restricted unpickler
(``weights_only=True``: tensors, numbers, strings and plain containers) and turns its refusal
into one line naming the file. :func:`save` serialises in memory first, so a full disk surfaces
as ``OSError(ENOSPC)`` from a plain ``write`` (which :func:`atomic_write` words as "No space left
on device while writing FILE") instead of torch's ``RuntimeError: unexpected pos ...``.

``tests/unit/test_tensor_files.py`` checks that no other module calls ``torch.load``.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from transferlab.atomic import atomic_write


class UnsafeFileError(RuntimeError):
    """A torch file that holds more than tensors and plain data (it would run code)."""


class CorruptFileError(RuntimeError):
    """A torch file that cannot be read (truncated, overwritten, not a torch file)."""


def load(path: Path | str, *, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """Read a torch file with the restricted unpickler (``mmap``: map the tensors' storage
    instead of reading it: processes that map one file share its pages).

    Raises:
        UnsafeFileError: the file names Python objects beyond tensors and plain data (a pickled
            module, or a planted payload): nothing of it was executed.
        CorruptFileError: the file is truncated or not a torch file.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"refusing to load {path}: it holds Python objects, not just tensors (loading it "
            "could run code; nothing was executed). Delete it if you did not write it, or "
            "re-create it with the transferlab command that makes it"
        ) from exc
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise CorruptFileError(
            f"cannot read {path} ({first}); delete it and re-run the command that writes it"
        ) from None


def save(obj: Any, path: Path | str) -> None:
    """``torch.save`` to a temp file beside ``path``, then rename (a kill never leaves half).

    Only tensors and plain data should go in, so :func:`load` can read it back.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_write(path) as f:
        f.write(buf.getbuffer())
