"""Data-parallel full fine-tuning: the epoch time of 2 processes against 1, on this machine.

    python benchmarks/distributed.py [--images 64] [--repeats 2] [--out distributed.json]

Full fine-tuning (``train_full``, the ``full`` section's defaults: Lite0 with its ImageNet
weights, 128 px, batch 16, augmentation, bf16 where the CPU has AMX) of ``--images`` random
224 px images, two epochs, run alternately as 1 process with all the CPU threads and as
``torch.distributed`` ranks under torchrun (gloo) with an equal share each: the same global
batch and seed. The figure is the ratio of the second epochs' times (the first warms up
oneDNN), 1 process over N, the median over the repeats, measured in this one run (and, as a
control, 1 process on 1 thread over N: a multi-threaded process suffers more than
single-threaded ones on a machine busy with other work); and the
largest difference between the weights the two trained (the same update in float rounding;
bf16 rounds more than fp32). A machine with C cores has C threads either way, so on a CPU the
gain comes only from what a single process leaves idle (Python between kernels, the
per-image augmentation, small kernels that use one thread): expect about 1x on 2 cores. The
scale-up is across machines and GPUs (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def worker(out: Path, n_images: int, precision: str) -> None:
    """One process, or one rank under torchrun: train, and rank 0 writes the epoch times and
    the weights."""
    from transferlab.backbones import load_backbone
    from transferlab.classifiers import distributed
    from transferlab.classifiers.full import train_full
    from transferlab.methods import FullParams

    distributed.init_from_env("gloo")
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n_images, 3, 224, 224, generator=g), torch.arange(n_images) % 5
    backbone = load_backbone("efficientnet_lite0", "package")
    params = FullParams(epochs=2, min_steps=0, precision=precision)
    res = train_full(backbone=backbone, n_classes=5, params=params, x_train=x, y_train=y,
                     input_size=params.image_size)  # fmt: skip
    if distributed.is_main():
        weights = [p.detach().double().flatten() for p in (*backbone.body.parameters(),
                                                          *res.head.parameters())]  # fmt: skip
        torch.save({"epoch_seconds": [h["seconds"] for h in res.history],
                    "threads": torch.get_num_threads(), "bf16": res.bf16,
                    "weights": torch.cat(weights)}, out)  # fmt: skip


def run(
    processes: int, out: Path, n_images: int, precision: str, threads: int | None = None
) -> dict:
    from transferlab.classifiers import distributed

    program = [str(Path(__file__).resolve()), "--worker", str(out), "--images", str(n_images)]
    program += ["--precision", precision]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    env.pop("OMP_NUM_THREADS", None)  # each run gets its share of this machine's threads
    env.update(distributed.local_env(processes))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, *program]
    if processes > 1:
        cmd = distributed.torchrun_command(processes, program)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    got = torch.load(out, weights_only=True)
    return {
        "processes": processes,
        "threads_each": got["threads"],
        "bf16": got["bf16"],
        "epoch_seconds": [round(s, 2) for s in got["epoch_seconds"]],
        "wall_s": round(wall, 1),
        "load_avg_start_end": [round(load0, 1), round(os.getloadavg()[0], 1)],
        "weights": got["weights"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="training images (224 px)")
    parser.add_argument("--processes", type=int, default=2, help="ranks to compare with 1")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--out", type=Path, default=Path("distributed.json"))
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.images, args.precision)
        return
    tmp = args.out.with_suffix(".tmp.pt")
    rows, ratios, ratios_1t, diffs = [], [], [], []
    for r in range(args.repeats):
        one = run(1, tmp, args.images, args.precision)
        many = run(args.processes, tmp, args.images, args.precision)
        # the control: one process on one thread (what each rank has); it tells the parallel
        # gain apart from how a multi-threaded process fares on a busy machine
        single = run(1, tmp, args.images, args.precision, threads=1)
        last = many["epoch_seconds"][-1]
        ratios.append(one["epoch_seconds"][-1] / last)
        ratios_1t.append(single["epoch_seconds"][-1] / last)
        diffs.append(float((one.pop("weights") - many.pop("weights")).abs().max()))
        single.pop("weights")
        rows += [one, many, single]
        print(f"repeat {r + 1}: s/epoch 1 process x {one['threads_each']} threads "
              f"{one['epoch_seconds']}, {args.processes} processes x {many['threads_each']} "
              f"{many['epoch_seconds']}, 1 process x 1 thread {single['epoch_seconds']}: "
              f"x{ratios[-1]:.2f} (x{ratios_1t[-1]:.2f} over 1 thread), max |dw| "
              f"{diffs[-1]:.2g}", flush=True)  # fmt: skip
    tmp.unlink(missing_ok=True)
    result = {
        "cpus": os.cpu_count(),
        "images": args.images,
        "processes": args.processes,
        "speedup_median": round(statistics.median(ratios), 3),
        "speedups": [round(x, 3) for x in ratios],
        "speedup_over_one_thread_median": round(statistics.median(ratios_1t), 3),
        "speedups_over_one_thread": [round(x, 3) for x in ratios_1t],
        "max_abs_weight_diff": max(diffs),
        "runs": rows,
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))


if __name__ == "__main__":
    main()
