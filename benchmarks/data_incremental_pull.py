"""Incremental pull: after the source grows by 10%, the pull against a cold pull of the grown
source, measured in one run.

    python benchmarks/data_incremental_pull.py [--images 10000 60000] [--grow 0.1]

For each N: writes N Fashion-MNIST images (Debian's ``dataset-fashion-mnist`` IDX files, train
then t10k) as PNG files into a class-per-folder source and pulls it; adds ``grow * N`` more
images and pulls again (incremental: unchanged files are neither read nor copied, only the new
ones are read, decoded and copied in); then pulls the grown source into an empty folder (cold).
Reports both times and their ratio (goal: <= 0.15).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transferlab.config import FASHION_MNIST_CLASSES, DataParams, FolderSource  # noqa: E402
from transferlab.data.idx import find_idx, read_idx  # noqa: E402
from transferlab.data.pull import pull_dataset  # noqa: E402

IDX = Path("/usr/share/datasets/fashion-mnist")


def write_images(root: Path, images, labels, start: int, stop: int) -> None:
    for i in range(start, stop):
        folder = root / FASHION_MNIST_CLASSES[int(labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(images[i]).save(buf, format="PNG")
        (folder / f"{i:05d}.png").write_bytes(buf.getvalue())


def timed(params: DataParams, out: Path) -> float:
    start = time.perf_counter()
    pull_dataset(params, out)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, nargs="+", default=[10_000, 60_000])
    ap.add_argument("--grow", type=float, default=0.1)
    args = ap.parse_args()
    # train + t10k: 70,000 images, enough for 60,000 plus 10%
    images = np.concatenate([read_idx(find_idx(IDX, s, "images")) for s in ("train", "t10k")])
    labels = np.concatenate([read_idx(find_idx(IDX, s, "labels")) for s in ("train", "t10k")])
    for n in args.images:
        extra = int(n * args.grow)
        if n + extra > len(images):
            raise SystemExit(f"at most {len(images)} images: lower --images or --grow")
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            src = tmp / "src"
            params = DataParams(source=FolderSource(path=src), min_size=28)
            write_images(src, images, labels, 0, n)
            first = timed(params, tmp / "ws")
            write_images(src, images, labels, n, n + extra)
            incremental = timed(params, tmp / "ws")
            cold = timed(params, tmp / "cold")
        print(
            f"{n} + {extra} images: first pull {first:6.2f} s, cold pull of {n + extra} "
            f"{cold:6.2f} s, incremental {incremental:6.2f} s = {incremental / cold:.1%} of cold"
        )


if __name__ == "__main__":
    main()
