"""`transferlab label suggest` on a large unlabelled pool whose features are cached.

    python benchmarks/label_suggest.py --images 10000

A tiny workspace (3 classes x 8 generated images) runs pull, split, features and svm with the
real Lite0 weights. ``--images`` distinct generated PNGs form the unlabelled pool. Feature
extraction is reported apart: measured on ``--extract`` of them (img/s, and the time the whole
pool would take at that rate). The rest of the pool's cache rows are then filled with stand-in
vectors in the same key space (extracting them all would take hours on a shared 2-core CPU; the
suggest step only reads them), and suggest runs for each strategy, timed by phase (loading the
model, listing the pool, pull's checks, reading the cached features, scoring and selecting,
writing thumbnails and the CSV). The first run meets the pool's files for the first time
(pull's checks decode every file: reported apart, like the extraction it comes with); the later
runs find them unchanged (pull's rule: same size and mtime, not read again). Last, the command
itself, ``transferlab label suggest``, in a fresh process (Python start and imports included):
its wall and CPU seconds, and the machine's load average.

Prints one JSON object; ``ratio_to_target`` = seconds / the 10 s goal (<= 1 meets it).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_SECONDS = 10.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--extract", type=int, default=64, help="images really extracted (rate)")
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument(
        "--strategies", default="margin,entropy,kcenter,badge,random", help="comma-separated"
    )
    ap.add_argument("--keep", action="store_true", help="keep the workspace (printed) afterwards")
    args = ap.parse_args()

    from tests.conftest import draw_image, tiny_params, write_workspace
    from transferlab.active.suggest import check_candidates, list_unlabelled, suggest
    from transferlab.backbones import load_backbone
    from transferlab.cache import FeatureCache
    from transferlab.config import load_params
    from transferlab.features import extract_features, key_space
    from transferlab.stages import STAGES

    tmp = Path(tempfile.mkdtemp(prefix="bench-suggest-"))
    if not args.keep:  # 10,000 images and their cache rows: hundreds of MB left behind otherwise
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    kinds = ("circles", "squares", "stripes")
    for c, kind in enumerate(kinds):
        (tmp / "data" / kind).mkdir(parents=True)
        for i in range(8):
            draw_image(kind, seed=100 * c + i).save(tmp / "data" / kind / f"{kind}_{i}.png")
    ws = write_workspace(tmp / "ws", tiny_params(tmp / "data"))
    params = load_params(ws / "params.yaml")
    for name in ("pull", "split", "features", "svm"):
        STAGES[name].run(params, ws)

    pool = ws / "unlabelled"
    pool.mkdir()
    t = time.perf_counter()
    for i in range(args.images):
        draw_image(kinds[i % 3], seed=100_000 + i, size=48).save(pool / f"u{i:05d}.png")
    gen_seconds = time.perf_counter() - t

    fp = params.features
    bb = load_backbone(fp.backbone, fp.pretrained)
    paths = list_unlabelled(pool)
    ok, _ = check_candidates(paths, params, tmp)  # digests only; the memo lives in tmp
    shas = [c.sha256 for c in ok]
    cache_root = ws / fp.cache_dir
    t = time.perf_counter()
    feats, _ = extract_features(
        bb,
        [c.path for c in ok[: args.extract]],
        shas[: args.extract],
        cache_root=cache_root,
        batch_size=fp.batch_size,
        precision=fp.precision,
        background=tuple(params.data.background),
        record=False,
    )
    rate = args.extract / (time.perf_counter() - t)
    space = key_space(bb, background=tuple(params.data.background), precision=fp.precision)
    rest = np.random.default_rng(0).normal(size=(len(shas) - args.extract, feats.shape[1]))
    FeatureCache(cache_root, space).put(shas[args.extract :], rest.astype(np.float32))

    runs = []
    for i, strategy in enumerate(args.strategies.split(",")):
        s = suggest(
            params, ws, budget=args.budget, strategy=strategy, out=Path(f"labels/{strategy}.csv")
        )
        runs.append(
            {
                "strategy": strategy,
                "first_run": i == 0,
                **{k: v for k, v in s.items() if k.startswith(("seconds", "features_"))},
                "ratio_to_target": round(s["seconds_total"] / TARGET_SECONDS, 3),
            }
        )
    t, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        [sys.executable, "-m", "transferlab.cli", "label", "suggest", "-q"]
        + ["--budget", str(args.budget), "--strategy", "margin", "--out", "labels/cli.csv"],
        cwd=ws,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    cli_seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds: what the wall time would be on an idle machine (the command is one thread
    # but for a few BLAS calls); the shared 2-core box runs other jobs beside it
    cli_cpu = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    print(
        json.dumps(
            {
                "images": args.images,
                "workspace": str(ws) if args.keep else None,
                "budget": args.budget,
                "generate_seconds": round(gen_seconds, 1),
                "extraction_img_per_s": round(rate, 2),
                "extraction_seconds_for_pool": round(args.images / rate, 1),
                "runs": runs,
                "cli_margin_seconds": round(cli_seconds, 2),
                "cli_margin_cpu_seconds": round(cli_cpu, 2),
                "cli_ratio_to_target": round(cli_seconds / TARGET_SECONDS, 3),
                "load_average_1min": round(os.getloadavg()[0], 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
