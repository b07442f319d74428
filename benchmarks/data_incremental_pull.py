"""Incremental pull: after the source grows by 10%, the pull against a cold pull of the grown
source, measured in one run.

    python benchmarks/data_incremental_pull.py [--images 10000 60000] [--grow 0.1] [--repeat 3]

For each N: writes N Fashion-MNIST images (Debian's ``dataset-fashion-mnist`` IDX files, train
then t10k) as PNG files into a class-per-folder source and pulls it; adds ``grow * N`` more
images. Then, ``repeat`` times: pulls again into a copy of that first dataset (incremental:
unchanged files are neither read nor copied, only the new ones are read, decoded and copied
in), and pulls the grown source into an empty folder (cold). The copy of the dataset is made of
hard links, so the incremental pull finds the files it wrote the first time.

Reports the best time of each (the least disturbed by other work on the machine) and their
ratio (goal: <= 0.15), and the ratio of each incremental/cold pair. CPU times (this process;
the pull decodes in-process below 32 MB of images) are shown too: on a busy machine they move
less than wall times.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
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


def link_tree(src: Path, dest: Path) -> None:
    """``dest`` as a copy of ``src`` made of hard links (same files, same mtimes)."""
    shutil.copytree(src, dest, copy_function=os.link)


def timed(params: DataParams, out: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of one pull into ``out``, on a settled disk: what the setup wrote
    (the images, the hard-linked copy) is flushed first, so the pull does not wait for it."""
    os.sync()
    wall, cpu = time.perf_counter(), time.process_time()
    pull_dataset(params, out)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, nargs="+", default=[10_000, 60_000])
    ap.add_argument("--grow", type=float, default=0.1)
    ap.add_argument("--repeat", type=int, default=3, help="incremental/cold pairs per size")
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
            first, _ = timed(params, tmp / "first")
            write_images(src, images, labels, n, n + extra)
            incs, colds = [], []
            # fresh folders each time: nothing is deleted until the end, so no disk work left
            # over from a removal slows down the pull that follows
            for r in range(args.repeat):
                link_tree(tmp / "first", tmp / f"ws{r}")
                incs.append(timed(params, tmp / f"ws{r}"))
                colds.append(timed(params, tmp / f"cold{r}"))
            # before the folder goes: removing 200,000 files takes minutes on a busy disk
            inc, cold = min(w for w, _ in incs), min(w for w, _ in colds)
            inc_cpu, cold_cpu = min(c for _, c in incs), min(c for _, c in colds)
            pairs = " ".join(f"{i / c:.1%}" for (i, _), (c, _) in zip(incs, colds, strict=True))
            print(
                f"{n} + {extra} images: first pull {first:6.2f} s; best of {args.repeat}: "
                f"cold pull of {n + extra} {cold:6.2f} s, incremental {inc:6.2f} s = "
                f"{inc / cold:.1%} of cold (CPU {inc_cpu:.2f} s / {cold_cpu:.2f} s = "
                f"{inc_cpu / cold_cpu:.1%}); each pair: {pairs}",
                flush=True,
            )


if __name__ == "__main__":
    main()
