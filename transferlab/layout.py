"""The workspace's files, as ``dvc.yaml`` declares them, and the readers every stage shares.

Stages talk through these files. This module sits below ``stages``, ``classifiers`` and
``robustness`` (they all read the split and the features the same way), so none of them imports
another's private helpers.
"""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import numpy as np

MANIFEST = "data/manifest.csv"
REJECTED = "data/rejected.json"
IMAGES = "data/images"
# where `label import` puts returned labels (<class>/<image>); pull merges them into data/
LABELLED_DIR = "labelled"
SPLIT = "data/split.csv"
FEATURES = "features/features.npz"
CONFUSION_DIR = "plots/confusion"
CHECKPOINT_DIR = ".transferlab/checkpoints"
PARTS = ("train", "val", "test")


def model_dir(method: str) -> str:
    """Where a method's stage stores its classifier."""
    return f"models/{method}"


def metrics_file(method: str) -> str:
    """Where a method's stage writes its accuracies, history and choices."""
    return f"metrics/{method}.json"


def checkpoint_file(method: str) -> str:
    """A gradient-trained method's per-epoch checkpoint (deleted once the model is saved)."""
    return f"{CHECKPOINT_DIR}/{method}.pt"


def split_rows(root: Path) -> list[dict]:
    """``data/split.csv`` as dicts (path, label, sha256, split)."""
    with open(root / SPLIT, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def dataset_classes(root: Path) -> list[str]:
    """The sorted class names of the split: index = logit position for every method."""
    return sorted({r["label"] for r in split_rows(root)})


def read_npz(path: Path, *keys: str) -> tuple[np.ndarray, ...]:
    """Arrays from a stage's ``.npz`` (never pickled objects); a corrupt file names itself."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return tuple(z[k] for k in keys)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(
            f"{path} is corrupt ({type(exc).__name__}: {str(exc)[:120]}); delete it and re-run "
            "the stage that writes it"
        ) from None


def labelled_features(root: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """Cached features per split (``x_<part>``: (N, D) float, ``y_<part>``: (N,) int64) and the
    sorted class list."""
    feats, paths = read_npz(root / FEATURES, "features", "path")
    paths = paths.tolist()
    by_path = dict(zip(paths, range(len(paths)), strict=True))
    rows = split_rows(root)
    classes = sorted({r["label"] for r in rows})
    out: dict[str, np.ndarray] = {}
    for part in PARTS:
        chosen = [r for r in rows if r["split"] == part]
        out[f"x_{part}"] = feats[[by_path[r["path"]] for r in chosen]] if chosen else feats[:0]
        out[f"y_{part}"] = np.array([classes.index(r["label"]) for r in chosen], dtype=np.int64)
    return out, classes
