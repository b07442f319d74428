"""What verifying every served feature costs: serving a warm cache with and without the check.

    python benchmarks/cache_verify.py [--images 10000] [--dim 1280] [--shard 1000] [--reps 5]

Fills a cache with N random feature rows (shards of ``--shard`` rows, as extraction writes
them), then serves all N rows three ways in one run: the old unchecked read (``np.load`` only),
the first checked read (sha256 of every shard against its name), and a later checked read (the
shards' size, mtime and inode match the record of the first one, so no hashing). Reports the
median seconds of each and the ratios to the unchecked read.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transferlab import cache  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--shard", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(args.images)]
        rng = np.random.default_rng(0)
        writer = cache.FeatureCache(root, "space")
        for at in range(0, args.images, args.shard):
            part = shas[at : at + args.shard]
            writer.put(part, rng.standard_normal((len(part), args.dim)).astype(np.float32))
        old = time.time_ns() - 3600 * 10**9  # past the "racily fresh" window
        for shard in cache.shards(root / "space"):
            os.utime(shard, ns=(old, old))

        def unchecked():
            for shard in cache.shards(root / "space"):
                with np.load(shard) as z:
                    z["sha256"].tolist(), z["features"]

        def checked(record):
            def run():
                for shard in cache.shards(root / "space"):
                    cache.read_shard(shard, record)

            return run

        record: dict = {}
        checked(record)()  # fills the record
        times: dict[str, list[float]] = {}
        for _ in range(args.reps):
            for name, fn in (
                ("unchecked", unchecked),
                ("checked, first read", checked({})),
                ("checked, recorded", checked(record)),
            ):
                start = time.perf_counter()
                fn()
                times.setdefault(name, []).append(time.perf_counter() - start)
        size = sum(p.stat().st_size for p in cache.shards(root / "space")) / 1e6
        base = statistics.median(times["unchecked"])
        n_shards = len(cache.shards(root / "space"))
        print(f"{args.images} rows x {args.dim} ({size:.0f} MB in {n_shards} shards)")
        for name, values in times.items():
            med = statistics.median(values)
            print(f"  {name:20s} {med:.3f} s  ({med / base:.2f}x unchecked)")


if __name__ == "__main__":
    main()
