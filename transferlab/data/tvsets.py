"""torchvision datasets by name: their own downloader into a cache, then PNG files per class."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path, PurePosixPath

import numpy as np

from transferlab.data.files import DataSourceError
from transferlab.progress import progress

log = logging.getLogger(__name__)


def load_torchvision(name: str, root: Path, *, split: str, download: bool):
    """Instantiate ``torchvision.datasets.<name>`` on ``root`` for ``split``.

    The datasets spell the split differently (``train=True``, ``split="train"``, or nothing);
    the constructor's signature says which.

    Raises:
        DataSourceError: the files are missing and ``download`` is off, or the download failed.
    """
    import torchvision.datasets as tvd

    cls = getattr(tvd, name)
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict = {"root": str(root), "download": download}
    if "train" in params:
        if split not in ("train", "test"):
            raise DataSourceError(f"{name} has splits train and test, not {split!r}")
        kwargs["train"] = split == "train"
    elif "split" in params:
        kwargs["split"] = split
    root.mkdir(parents=True, exist_ok=True)
    try:
        return cls(**kwargs)
    except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted"
        hint = "set data.source.download: true" if not download else "check the network"
        raise DataSourceError(f"torchvision {name} in {root}: {exc}; {hint}") from None
    except ValueError as exc:  # verify_str_arg: a split name this dataset does not have
        raise DataSourceError(f"torchvision {name}: {exc}; fix data.source.split") from None
    except OSError as exc:
        raise DataSourceError(f"torchvision {name}: download into {root} failed: {exc}") from None


def _class_names(ds, n: int) -> list[str]:
    names = getattr(ds, "classes", None) or getattr(ds, "categories", None)
    if not names:
        return [str(i) for i in range(n)]
    return [str(c).replace("/", "_") for c in names]


def _targets(ds) -> np.ndarray | None:
    """Labels without decoding images, where the dataset keeps them in a list."""
    for attr in ("targets", "labels", "_labels", "y"):
        t = getattr(ds, attr, None)
        if t is not None and not callable(t) and len(t) == len(ds):
            return np.asarray(t).reshape(-1)
    return None


def write_dataset_pngs(
    ds, out: Path, *, prefix: str, per_class: int | None
) -> list[tuple[Path, str, PurePosixPath]]:
    """Write every item of a torchvision dataset as ``out/<class>/<prefix>-<index>.png``.

    Args:
        ds: a dataset whose items are ``(PIL image, int label)`` (no transform set).
        out: folder to write into.
        prefix: start of each file name.
        per_class: keep at most this many images per class (the first by index).

    Returns:
        ``(path, label, rel)`` per written file.
    """
    from PIL import Image

    targets = _targets(ds)
    n_labels = int(targets.max()) + 1 if targets is not None and len(targets) else 0
    names = _class_names(ds, n_labels)
    counts: dict[int, int] = {}
    written: list[tuple[Path, str, PurePosixPath]] = []
    width = len(str(len(ds)))
    for i in progress(range(len(ds)), desc=f"writing {prefix} PNGs", unit="img"):
        if (
            targets is not None
            and per_class is not None
            and counts.get(int(targets[i]), 0) >= per_class
        ):
            continue  # skip without decoding
        image, y = ds[i]
        y = int(y)
        if per_class is not None and counts.get(y, 0) >= per_class:
            continue
        counts[y] = counts.get(y, 0) + 1
        label = names[y] if y < len(names) else str(y)
        rel = PurePosixPath(f"{prefix}-{i:0{width}d}.png")
        dest = out / label / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        image.save(dest, compress_level=1)
        written.append((dest, label, rel))
    return written
