"""APGD-CE throughput against the reference AutoAttack's (PyPI ``pyautoattack``), same model,
batch, budget and device, measured in the same run (interleaved repeats, best of each).

    python benchmarks/apgd.py --model tiny --images 64 --steps 100   # seconds
    python benchmarks/apgd.py --model lite0 --images 8 --steps 10    # real Lite0

Reports seconds per call and the ratio reference / ours (>= 1.0: we are at least as fast) for
our APGD-CE with ``early_stop`` (the pipeline's default: an image leaves the loop once fooled,
no verdict changes) and without it (every image takes every step, as the reference does), with
the robust accuracy of each beside the reference's. Our call also returns which images were
fooled; the reference's ``perturb`` returns them too (its ``acc``), so no extra pass is added.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.attacks import best_time, load  # noqa: E402
from tests.unit.attacks.test_autoattack import reference_autoattack  # noqa: E402
from transferlab.attacks import APGD  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "lite0"], default="tiny")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eps", type=float, default=1.0, help="in 1/255 units")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    model, x, y = load(args.model, args.images, args.device)
    eps = args.eps / 255
    ref = reference_autoattack(model, eps, steps=args.steps, square_queries=0).apgd
    ref.loss = "ce"
    ours = {
        "early_stop": APGD(eps=eps, steps=args.steps, early_stop=True),
        "every_step": APGD(eps=eps, steps=args.steps, early_stop=False),
    }
    robust = {"reference": int(ref.perturb(x, y, cheap=True)[0].sum())}
    robust |= {k: int((~a(model, x, y).success).sum()) for k, a in ours.items()}
    times = {"reference": [], **{k: [] for k in ours}}
    for _ in range(args.repeats):  # interleaved: a busy machine slows each alike
        times["reference"].append(best_time(lambda: ref.perturb(x, y, cheap=True), 1))
        for k, a in ours.items():
            times[k].append(best_time(lambda a=a: a(model, x, y), 1))
    best = {k: min(v) for k, v in times.items()}
    out = {
        "model": args.model,
        "images": args.images,
        "steps": args.steps,
        "eps_255": args.eps,
        "device": args.device,
        "seconds": best,
        "robust": robust,
        "ratio_reference_over_ours": {k: best["reference"] / best[k] for k in ours},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
