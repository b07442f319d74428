"""Stratified, reproducible train/val/test split of a manifest."""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from transferlab.config import SplitParams
from transferlab.data.manifest import is_labelled, read_manifest, write_csv_atomic
from transferlab.data.sources import DataSourceError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ("path", "label", "sha256", "split")


def split_sizes(n: int, *, val: float, test: float) -> tuple[int, int, int]:
    """Images of one class going to (train, val, test).

    Every class gets at least one test image, and one validation image when ``val > 0`` and the
    class has three or more; train takes the rest and may come out below one.
    """
    n_test = max(1, round(n * test))
    n_val = round(n * val)
    if val > 0 and n >= 3:
        n_val = max(1, n_val)
    return n - n_test - n_val, n_val, n_test


def min_class_size(*, val: float, test: float) -> int:
    """Smallest class size that leaves at least one training image."""
    n = 1
    while split_sizes(n, val=val, test=test)[0] < 1:
        n += 1
    return n


def _class_rng(seed: int, label: str) -> np.random.Generator:
    # One generator per class, keyed by its name: adding images to one class then cannot shift
    # the random stream, and so the assignment, of any other class.
    key = int.from_bytes(hashlib.sha256(label.encode("utf-8")).digest()[:8], "big")
    return np.random.default_rng([seed, key])


def split_manifest(manifest: Path, params: SplitParams, out: Path) -> dict[str, dict[str, int]]:
    """Assign every image of ``manifest`` to train, val or test, stratified by class.

    Within a class, images are ordered by sha256 (so the order does not depend on file names or
    listing order), shuffled by a generator seeded from ``params.seed`` and the class name, cut to
    ``params.per_class``, then dealt out as test, val, train.

    Args:
        manifest: ``manifest.csv`` written by :func:`~transferlab.data.pull.pull_dataset`.
        params: the ``split`` section.
        out: CSV to write, columns ``path,label,sha256,split``, rows in manifest order (images
            dropped by ``per_class`` are left out).

    Returns:
        ``{split: {label: count}}`` for the three splits, labels sorted.

    Raises:
        DataSourceError: a class has too few images for the requested fractions.
    """
    rows = read_manifest(manifest)
    by_class: dict[str, list[dict]] = defaultdict(list)
    # Labels imported into a class that has source images go to train: they were picked by a
    # model (biased, so no fair test), and keeping them out of the deal leaves every other
    # image's split as it was. A class made only of imported images (a new one) is dealt out.
    pinned: dict[str, list[dict]] = defaultdict(list)
    has_source = {row["label"] for row in rows if not is_labelled(row["path"])}
    for row in rows:
        if is_labelled(row["path"]) and row["label"] in has_source:
            pinned[row["label"]].append(row)
        else:
            by_class[row["label"]].append(row)
    if not by_class:
        raise DataSourceError(f"{manifest} lists no images; run the pull stage on a real source")

    need = min_class_size(val=params.val, test=params.test)
    short = {}
    for label, members in sorted(by_class.items()):
        n = min(len(members), params.per_class or len(members))
        if n < need:
            short[label] = n
    if short:
        listed = ", ".join(f"{label!r} has {n}" for label, n in short.items())
        cap = f" (after split.per_class={params.per_class})" if params.per_class else ""
        raise DataSourceError(
            f"too few images per class{cap}: {listed}; split.val={params.val} and "
            f"split.test={params.test} need at least {need} per class: add images to "
            f"{'that class' if len(short) == 1 else 'those classes'} or lower split.val/split.test"
        )

    assigned: dict[str, str] = {}
    counts: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    for label, members in sorted(by_class.items()):
        ordered = sorted(members, key=lambda r: (r["sha256"], r["path"]))
        order = _class_rng(params.seed, label).permutation(len(ordered))
        chosen = [ordered[i] for i in order[: params.per_class or len(ordered)]]
        n_train, n_val, n_test = split_sizes(len(chosen), val=params.val, test=params.test)
        if params.shots is not None:
            if n_train < params.shots:
                log.warning(
                    "class %r has only %d training images for split.shots=%d; using %d",
                    label,
                    n_train,
                    params.shots,
                    n_train,
                )
            n_train = min(n_train, params.shots)
        for i, row in enumerate(chosen):
            if i >= n_test + n_val + n_train:
                break  # beyond the shots: not used by this run
            split = "test" if i < n_test else "val" if i < n_test + n_val else "train"
            assigned[row["path"]] = split
        for row in pinned[label]:
            assigned[row["path"]] = "train"
        n_train += len(pinned[label])
        for split, n in zip(SPLITS, (n_train, n_val, n_test), strict=True):
            counts[split][label] = n

    out_rows = [{**row, "split": assigned[row["path"]]} for row in rows if row["path"] in assigned]
    write_csv_atomic(out, SPLIT_COLUMNS, out_rows)
    return counts
