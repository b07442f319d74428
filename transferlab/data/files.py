"""What every source lister shares: which names are images, which are litter, and the error.

The bottom of ``transferlab.data``: ``sources`` and the remote listers it dispatches to
(``http``, ``s3``, ``tvsets``) import from here, so neither imports the other's module back.
"""

from __future__ import annotations

from transferlab.redact import redact

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
# Litter that operating systems and archivers leave in folders.
_JUNK_NAMES = frozenset({"__macosx", "thumbs.db", "desktop.ini", ".ds_store"})


class DataSourceError(RuntimeError):
    """The data source cannot give a usable dataset; the message is one line saying what to do.

    Credentials in any URL of the message are masked: it is printed, logged and stored by
    Prefect as the failed task's state message.
    """

    def __init__(self, message: str) -> None:
        super().__init__(redact(str(message)))


def is_junk(name: str) -> bool:
    """Hidden files and folders, and operating-system litter (``__MACOSX``, ``Thumbs.db``...)."""
    return name.startswith(".") or name.lower() in _JUNK_NAMES
