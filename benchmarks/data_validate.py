"""Image checking throughput of the pull stage: all cores against one, measured in one run.

    python benchmarks/data_validate.py [--images 10000] [--size 96]

Writes N distinct JPEGs into a class-per-folder source, then runs
:func:`transferlab.data.pull.pull_dataset` (full decode, hash, copy, manifest) with one worker
process and with the automatic choice (every core the process may use). Reports images/s of both
and the speed-up.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transferlab.config import DataParams, FolderSource  # noqa: E402
from transferlab.data.pull import pull_dataset  # noqa: E402


def write_source(root: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    for i in range(n):
        img = base.copy()
        img[i % size, :, :] = i % 256  # distinct bytes, so no image is a duplicate
        img[:, (i // size) % size, 0] = (i // 256) % 256
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.jpg").write_bytes(buf.getvalue())


def run(params: DataParams, out: Path, workers: int | None) -> float:
    start = time.perf_counter()
    result = pull_dataset(params, out, workers=workers)
    elapsed = time.perf_counter() - start
    assert sum(result.kept.values()) + result.n_rejected > 0
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=96)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        write_source(tmp / "src", args.images, args.size)
        params = DataParams(source=FolderSource(path=tmp / "src"))
        one = run(params, tmp / "one", 1)
        # workers=cores: every core; the automatic choice would too at this many bytes per core
        # only for larger files, so ask for it explicitly.
        many = run(params, tmp / "many", cores)
    n = args.images
    print(f"{n} JPEGs {args.size}x{args.size}, full decode + sha256 + copy + manifest")
    print(f"  1 process:    {one:6.2f} s  {n / one:7.0f} images/s")
    print(f"  {cores} processes:  {many:6.2f} s  {n / many:7.0f} images/s")
    print(f"  speed-up:     {one / many:6.2f}x on {cores} cores")


if __name__ == "__main__":
    main()
