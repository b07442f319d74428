"""Feature-stage throughput as a ratio against a bare torch loop, measured in one run.

    python benchmarks/features.py [--images N] [--batch 16]

Both sides use the same backbone, batch size, precision and images, on the bundled photo dataset
(Debian's tuxpaint-stamps-default). The stage side pays for decoding and caching too; the bare
loop gets the images already decoded, so the ratio shows what the stage's overhead costs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from transferlab.backbones import load_backbone
from transferlab.config import TuxpaintSource
from transferlab.data import file_sha256
from transferlab.data.sources import list_source
from transferlab.features import extract_features, load_images


def bare_loop(backbone, x: torch.Tensor, batch: int) -> float:
    """Images per second of model.features over pre-decoded batches."""
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            backbone.features(x[i : i + batch])
    return len(x) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()

    files, _ = list_source(TuxpaintSource())
    paths = [f.path for f in files][: args.images]
    shas = [file_sha256(p) for p in paths]
    backbone = load_backbone("efficientnet_lite0", "package")
    x = load_images(paths, backbone.spec)

    bare_loop(backbone, x[: args.batch], args.batch)  # warm-up: allocator, kernels
    bare = bare_loop(backbone, x, args.batch)
    with tempfile.TemporaryDirectory() as cache:
        _, stats = extract_features(
            backbone, paths, shas, cache_root=Path(cache), batch_size=args.batch
        )
        stage = len(paths) / stats.seconds
        _, warm = extract_features(
            backbone, paths, shas, cache_root=Path(cache), batch_size=args.batch
        )
    print(f"images: {len(paths)}, batch {args.batch}, threads {torch.get_num_threads()}")
    print(f"bare torch loop (decoded): {bare:8.1f} img/s")
    print(f"feature stage (cold):      {stage:8.1f} img/s")
    print(f"ratio stage / bare:        {stage / bare:8.3f}")
    print(f"warm re-run / cold run:    {warm.seconds / stats.seconds:8.4f}")


if __name__ == "__main__":
    main()
