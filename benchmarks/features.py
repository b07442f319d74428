"""Feature extraction speed as ratios against references measured in the same run.

    python benchmarks/features.py [--dataset photos|fmnist|both] [--images 128] [--fmnist 1000]
                                  [--batch 16] [--workers 0] [--repeats 3] [--no-dask]

For each dataset (the bundled photos, Debian's tuxpaint-stamps-default; and a Fashion-MNIST
subset read straight from Debian's dataset-fashion-mnist IDX files) it prints:

1. stage / bare: the feature stage's throughput (decoding in DataLoader workers, the cache)
   over a bare torch loop on already-decoded images (same model, batch, dtype).
2. warm / cold: a re-run with nothing changed over the cold run.
3. +10% / cold: a run after adding 10% new images over the cold run (of all images).
4. bf16 / fp32: bare-loop throughput with bf16 autocast over fp32, and their feature agreement.
5. bare GFLOP/s / matmul GFLOP/s: how close the model runs to this machine's dense-matmul speed.
6. dask 2 workers / 1 worker: throughput of the shard stage on a Dask LocalCluster (1 thread
   per worker), the same shards.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transferlab.backbones import load_backbone
from transferlab.data import file_sha256
from transferlab.features import cosine_agreement, extract_features, load_images

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def bare_loop(backbone, x: torch.Tensor, batch: int, precision: str = "fp32"):
    """(images per second, features) of model.features over pre-decoded batches."""
    model = backbone.to(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if precision == "bf16" else None
    out = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(dtype)):
        model.features(x[:batch].contiguous(memory_format=torch.channels_last))  # warm-up
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            xb = x[i : i + batch].contiguous(memory_format=torch.channels_last)
            out.append(model.features(xb).float())
        seconds = time.perf_counter() - start
    return len(x) / seconds, torch.cat(out).numpy()


def model_flops(backbone, size: int) -> float:
    """Forward FLOPs of ``features`` for one image (multiply-add = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        backbone.features(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def matmul_gflops(dtype=torch.float32, n: int = 2048, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def photo_files(n: int) -> list[Path]:
    from transferlab.config import TuxpaintSource
    from transferlab.data.sources import list_source

    files, _ = list_source(TuxpaintSource())
    rng = np.random.default_rng(0)
    return [files[i].path for i in rng.permutation(len(files))[:n]]


def fmnist_files(n: int, folder: Path) -> list[Path]:
    """The first ``n`` Fashion-MNIST training images, written as PNGs into ``folder``."""
    with gzip.open(FMNIST / "train-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    # IDX: magic, count, rows, cols (big-endian int32), then uint8 pixels
    count, rows, cols = np.frombuffer(raw[4:16], dtype=">i4")
    images = np.frombuffer(raw[16:], np.uint8).reshape(count, rows, cols)[:n]
    paths = []
    for i, img in enumerate(images):
        p = folder / f"fmnist_{i:05d}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def dask_throughput(paths, shas, n_workers: int, n_shards: int, batch: int, cache: Path) -> float:
    """Images per second of the shard extraction on a LocalCluster with ``n_workers``."""
    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)  # distributed resets it on import

    def shard(i: int) -> int:
        import torch as t

        from transferlab.backbones import load_backbone as load
        from transferlab.features import extract_features as extract

        t.set_num_threads(1)
        mine = [k for k in range(len(paths)) if k % n_shards == i]
        extract(
            load("efficientnet_lite0", "package"),
            [paths[k] for k in mine],
            [shas[k] for k in mine],
            cache_root=cache,
            batch_size=batch,
            record=False,
        )
        return len(mine)

    with (
        tempfile.TemporaryDirectory() as scratch,
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            local_directory=scratch,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(lambda: __import__("transferlab.features"))  # imports off the clock
        start = time.perf_counter()
        done = sum(client.gather(client.map(shard, range(n_shards))))
        return done / (time.perf_counter() - start)


def run(name: str, paths: list[Path], args) -> None:
    shas = [file_sha256(p) for p in paths]
    backbone = load_backbone("efficientnet_lite0", "package")
    size = backbone.spec.input_size
    x = load_images(paths, backbone.spec)
    bare16, f16 = bare_loop(backbone, x, args.batch, "bf16")
    kw = {"batch_size": args.batch, "num_workers": args.workers, "record": False}
    # Interleaved repeats, best of each: a busy moment slows one run, not one side of a ratio.
    bare_seconds, cold, warm, grown = [], [], [], []
    for _ in range(args.repeats):
        rate, f32 = bare_loop(backbone, x, args.batch)
        bare_seconds.append(len(x) / rate)
        with tempfile.TemporaryDirectory() as c1, tempfile.TemporaryDirectory() as c2:
            cold.append(extract_features(backbone, paths, shas, cache_root=Path(c1), **kw)[1])
            warm.append(extract_features(backbone, paths, shas, cache_root=Path(c1), **kw)[1])
            cut = int(len(paths) * 0.9)
            extract_features(backbone, paths[:cut], shas[:cut], cache_root=Path(c2), **kw)
            grown.append(extract_features(backbone, paths, shas, cache_root=Path(c2), **kw)[1])
    cold, warm, grown = (min(runs, key=lambda s: s.seconds) for runs in (cold, warm, grown))
    bare = len(x) / min(bare_seconds)
    mean_cos, min_cos = cosine_agreement(f32, f16)
    stage = len(paths) / cold.seconds
    flops = model_flops(backbone, size)
    mm32, mm16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)

    print(
        f"\n== {name}: {len(paths)} images, batch {args.batch}, "
        f"{args.workers} decode workers, {torch.get_num_threads()} torch threads, "
        f"best of {args.repeats}"
    )
    print(f"bare torch loop fp32 (decoded): {bare:8.1f} img/s")
    print(f"feature stage cold fp32:        {stage:8.1f} img/s")
    print(f"1. stage / bare:                {stage / bare:8.3f}   (goal >= 0.95)")
    print(f"2. warm / cold:                 {warm.seconds / cold.seconds:8.4f}   (goal <= 0.05)")
    print(f"3. +10% new / cold:             {grown.seconds / cold.seconds:8.4f}   (goal <= 0.15)")
    print(
        f"4. bf16 / fp32 (bare loop):     {bare16 / bare:8.3f}   "
        f"cosine mean {mean_cos:.5f} min {min_cos:.5f}"
    )
    print(
        f"5. bare GFLOP/s / matmul:       {bare * flops / 1e9 / mm32:8.3f}   "
        f"({bare * flops / 1e9:.1f} of {mm32:.1f} GFLOP/s fp32, "
        f"{flops / 1e9:.2f} GFLOP/img); bf16 {bare16 * flops / 1e9 / mm16:.3f} "
        f"of {mm16:.1f}"
    )
    if args.dask:
        n_shards = 4
        with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
            one = dask_throughput(paths, shas, 1, n_shards, args.batch, Path(d1))
            two = dask_throughput(paths, shas, 2, n_shards, args.batch, Path(d2))
        print(
            f"6. dask 2 workers / 1 worker:   {two / one:8.3f}   "
            f"({two:.1f} vs {one:.1f} img/s, {n_shards} shards, 1 thread per worker)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dataset", choices=("photos", "fmnist", "both"), default="both")
    ap.add_argument("--images", type=int, default=128, help="photos to use")
    ap.add_argument("--fmnist", type=int, default=1000, help="Fashion-MNIST images to use")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--workers", type=int, default=0, help="DataLoader decode workers (params.yaml: 0)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs; the best counts")
    ap.add_argument("--no-dask", dest="dask", action="store_false")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    torch.manual_seed(0)
    if args.dataset in ("photos", "both"):
        run("photos (tuxpaint-stamps-default)", photo_files(args.images), args)
    if args.dataset in ("fmnist", "both"):
        with tempfile.TemporaryDirectory() as folder:
            run("Fashion-MNIST", fmnist_files(args.fmnist, Path(folder)), args)


if __name__ == "__main__":
    main()
