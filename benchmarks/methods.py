"""The three methods' training cost as ratios against references measured in the same run.

    python benchmarks/methods.py [--repeats 3] [--threads N] [--only svm,top,full]

1. svm: ``fit_svm`` (one C, standardise + LinearSVC) divided by a bare ``liblinear`` fit
   (the ``liblinear-official`` package) on the same standardised features, same solver
   (L2-regularised L2-loss dual, ``-s 1``), C, tolerance and bias. Goal: <= 1.1.
2. top: training the head on cached features vs through the frozen backbone (augmentation
   off, same init and data order): the speed-up, and the accuracy difference (should be 0).
3. full: ``train_full`` images/s divided by a bare torch loop (same model, param groups, batch,
   precision, memory layout, SGD), each timed around the whole call: goal >= 0.9. Also the
   bare loop in NCHW, so the gain of channels_last (``load_backbone``'s layout, and
   ``train_full``'s on a CPU) shows on its own.

Each timing is the best of ``--repeats`` (the machine is shared; the best is the least noisy).
For ``full`` the runs interleave and rotate their order every repeat, and the median of the
per-repeat ratios is printed next to the ratio of the bests: when the two disagree, the machine
was too busy for either. On a loaded 2-core machine two intra-op threads can run several times
slower than one (spinning threads wait for each other); ``--threads 1`` gives steadier figures,
and with it the ratio in CPU time, which other jobs' load does not move.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import numpy as np
import torch
from torch import nn

from transferlab.backbones import load_backbone
from transferlab.classifiers.full import train_full
from transferlab.classifiers.svm import fit_svm
from transferlab.classifiers.top import train_top
from transferlab.classifiers.training import accuracy, predict, use_channels_last
from transferlab.config import FullParams, TopParams


def best_of(repeats: int, fn) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_svm(repeats: int) -> dict:
    from liblinear.liblinearutil import parameter, problem, train

    rng = np.random.default_rng(0)
    n, d, k = 600, 1280, 5  # Lite0's feature width, a dataset of a few hundred images
    centers = rng.normal(0, 1, (k, d))
    y = rng.integers(0, k, n)
    x = (centers[y] + rng.normal(0, 3, (n, d))).astype(np.float32)
    c = 0.01
    xs = ((x - x.mean(0)) / x.std(0)).astype(np.float64)
    # sklearn's LinearSVC passes tol=1e-4, intercept_scaling=1 (-B 1), max_iter=1000
    # the binding's dense -> feature-node conversion is not liblinear's work: done outside
    prob = problem(y.astype(np.float64), xs)
    param = parameter(f"-s 1 -c {c} -e 0.0001 -B 1 -q")
    ours, bare = [], []
    for _ in range(max(repeats, 5)):  # sub-second fits: interleaved, so load hits both alike
        ours.append(best_of(1, lambda: fit_svm(x, y, C_grid=(c,), cv=3, max_iter=1000))[0])
        bare.append(best_of(1, lambda: train(prob, param))[0])
    return {
        "svm_fit_s": min(ours),
        "liblinear_fit_s": min(bare),
        "ratio": min(ours) / min(bare),
        "ratio_median": statistics.median(o / b for o, b in zip(ours, bare, strict=True)),
    }


def bench_top(repeats: int) -> dict:
    bb = load_backbone("efficientnet_lite0", "package")
    g = torch.Generator().manual_seed(0)
    n, size = 96, 64
    y = torch.arange(n) % 4
    x = (torch.rand(n, 3, size, size, generator=g) * 0.4).clamp(0, 1)
    x[torch.arange(n), y % 3] += 0.5
    x = x.clamp(0, 1)
    params = TopParams(epochs=5, batch_size=16, augment=False)
    with torch.no_grad():
        f = bb.features(x)
    t_feat, r_feat = best_of(
        repeats, lambda: train_top(n_classes=4, params=params, x_train=f, y_train=y)
    )
    t_bb, r_bb = best_of(
        1, lambda: train_top(n_classes=4, params=params, x_train=x, y_train=y, backbone=bb)
    )
    acc_feat = accuracy(predict(r_feat.head, f), y)
    acc_bb = accuracy(predict(r_bb.head, f), y)
    return {
        "cached_s": t_feat,
        "through_backbone_s": t_bb,
        "speedup": t_bb / t_feat,
        "acc_cached": acc_feat,
        "acc_through_backbone": acc_bb,
        "acc_difference": acc_feat - acc_bb,
    }


def bare_full_loop(bb, head, x, y, params: FullParams, *, channels_last: bool = False) -> float:
    """Plain SGD over the same param groups, batch and precision; returns images/s.

    ``channels_last``: the backbone and the batches in that layout (``train_full``'s on a CPU),
    else in NCHW.
    """
    layout = torch.channels_last if channels_last else torch.contiguous_format
    bb.to(memory_format=layout)
    x = x.contiguous(memory_format=layout)
    opt = torch.optim.SGD(
        [
            {"params": bb.parameters(), "lr": params.lr * params.backbone_lr_ratio},
            {"params": head.parameters(), "lr": params.lr},
        ],
        lr=params.lr,
        momentum=params.momentum,
        weight_decay=params.weight_decay,
    )
    for p in bb.parameters():
        p.requires_grad_(True)
    bb.train()
    for m in bb.modules():  # the same frozen BatchNorm statistics train_full uses by default
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    head.train()
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(params.epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), params.batch_size):
            idx = perm[i : i + params.batch_size]
            loss = loss_fn(head(bb.features(x[idx])), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return params.epochs * len(y) / (time.perf_counter() - start)


def bench_full(repeats: int) -> dict:
    n, size = 64, 64
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 3, size, size, generator=g), torch.arange(n) % 4
    params = FullParams(
        epochs=2, batch_size=16, image_size=size, augment=False, precision="fp32", resume=False
    )
    same_layout = use_channels_last(torch.device("cpu"))
    images = params.epochs * n

    def timed(fn) -> tuple[float, float]:
        """(wall, CPU of this thread) seconds of the whole call, setup included."""
        bb = load_backbone("efficientnet_lite0", "package")
        wall, cpu = time.perf_counter(), time.thread_time()
        fn(bb)
        return time.perf_counter() - wall, time.thread_time() - cpu

    def ours(bb) -> None:
        train_full(backbone=bb, n_classes=4, params=params, x_train=x, y_train=y)

    def bare(bb, channels_last: bool) -> None:
        head = nn.Linear(bb.feature_dim, 4)
        bare_full_loop(bb, head, x, y, params, channels_last=channels_last)

    runs = {
        "ours": ours,
        "bare": lambda bb: bare(bb, same_layout),
        "bare_nchw": lambda bb: bare(bb, False),
    }
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(repeats):  # interleaved and rotated: load changes and warm-up hit all alike
        for name in names[r % len(names) :] + names[: r % len(names)]:
            w, c = timed(runs[name])
            wall[name].append(w)
            cpu[name].append(c)

    def speed(times: dict[str, list[float]], a: str, b: str) -> float:
        """How fast a runs relative to b, as the median over the repeats' pairs."""
        return statistics.median(tb / ta for ta, tb in zip(times[a], times[b], strict=True))

    return {
        "train_full_img_s": images / min(wall["ours"]),
        "bare_loop_img_s": images / min(wall["bare"]),
        "bare_nchw_img_s": images / min(wall["bare_nchw"]),
        "ratio": min(wall["bare"]) / min(wall["ours"]),
        "ratio_median": speed(wall, "ours", "bare"),
        # with one intra-op thread all the work is on this thread, and CPU time does not count
        # the time other jobs hold the cores (with more threads it counts their spinning)
        "ratio_cpu": speed(cpu, "ours", "bare") if torch.get_num_threads() == 1 else None,
        "vs_nchw": min(wall["bare_nchw"]) / min(wall["ours"]),
        "layout": "channels_last" if same_layout else "nchw",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--only", default="svm,top,full", help="comma-separated benchmarks to run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    print(f"threads {torch.get_num_threads()}")
    if "svm" in only:
        s = bench_svm(args.repeats)
        print(
            f"svm:  fit_svm {s['svm_fit_s']:.3f} s / bare liblinear {s['liblinear_fit_s']:.3f} s"
            f" = {s['ratio']:.3f}, median of pairs {s['ratio_median']:.3f}  (goal <= 1.1)"
        )
    if "top" in only:
        t = bench_top(args.repeats)
        print(
            f"top:  cached features {t['cached_s']:.3f} s vs through backbone "
            f"{t['through_backbone_s']:.2f} s: speed-up {t['speedup']:.0f}x, accuracy difference "
            f"{t['acc_difference']:+.3f}"
        )
    if "full" in only:
        f = bench_full(args.repeats)
        print(
            f"full: train_full {f['train_full_img_s']:.1f} img/s / bare loop ({f['layout']}) "
            f"{f['bare_loop_img_s']:.1f} img/s = {f['ratio']:.3f}, median of pairs "
            f"{f['ratio_median']:.3f}  (goal >= 0.9)"
        )
        if f["ratio_cpu"] is not None:
            print(f"      in CPU time (one thread, load-proof): {f['ratio_cpu']:.3f}")
        print(
            f"      bare loop in NCHW {f['bare_nchw_img_s']:.1f} img/s: train_full runs "
            f"{f['vs_nchw']:.2f}x that"
        )


if __name__ == "__main__":
    main()
