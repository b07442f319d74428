"""Attack speed and query efficiency as ratios against torchattacks, measured in the same run.

    python benchmarks/attacks.py --model lite0 --images 8          # real Lite0, foolbox photos
    python benchmarks/attacks.py --model tiny --images 64          # a tiny CNN, seconds

Reports:
    * throughput ratio = torchattacks seconds / ours seconds for FGSM and PGD-10 on the same
      model, batch and device (>= 1.0 means we are at least as fast); the best of ``--repeats``
      interleaved runs of each, so a busy machine hurts both alike. Our call also returns which
      images were fooled (one more forward pass, whose logits the pipeline reuses); torchattacks
      returns only the images, so the ratio is given twice: against torchattacks alone, and
      against torchattacks plus the forward pass that tells success. Rows: FGSM at one eps;
      FGSM over the 4 nonzero eps of params.yaml's sweep (ours: one gradient, ``sweep``);
      PGD-10 taking every step (torchattacks' semantics) and with ``early_stop`` (the
      pipeline's default), with the robust accuracy of each beside torchattacks';
    * queries to reach 50% success (the median per-image query count, an image that is never
      fooled counting as infinite) for Square and NES at eps 4/255 and 8/255. torchattacks'
      Square reports no per-image counts, so for it we double the budget from 10 until half the
      images are fooled, and the same for ART's SquareAttack. No installed library ships NES
      (neither ART nor foolbox has it), so NES is reported alone;
    * HopSkipJump: the median L-inf distance of its adversarials, ours after 1,000 queries per
      image (from its default start: the nearest image of the batch on the adversarial side)
      against foolbox's HopSkipJumpAttack with the fewest iterations that spend at least as
      many queries (counted by a wrapper), from random-noise starts given to it for free.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torchattacks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transferlab.attacks import FGSM, NES, PGD, Square, sweep  # noqa: E402


def load(model_name: str, n: int, device: str):
    if model_name == "tiny":
        from tests.unit.attacks.conftest import make_tiny_cnn, random_images

        model = make_tiny_cnn()
        x = random_images(n, torch.Generator().manual_seed(0))
    else:
        from importlib import resources

        from transferlab.backbones import load_backbone
        from transferlab.features import load_images

        model = load_backbone("efficientnet_lite0", "package")
        files = sorted(Path(str(resources.files("foolbox") / "data")).glob("imagenet_*"))[:n]
        x = load_images(files, model.spec)
    model = model.to(device).eval()
    x = x.to(device)
    with torch.no_grad():
        y = model(x).argmax(1)  # attack the model's own predictions: clean accuracy 1
    return model, x, y


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def median_queries(queries: torch.Tensor, success: torch.Tensor) -> float:
    q = torch.where(success, queries.double(), torch.tensor(math.inf, dtype=torch.float64))
    return float(q.sort().values[(len(q) - 1) // 2])


def fooled(model, adv, y) -> float:
    with torch.no_grad():
        return float((model(adv).argmax(1) != y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "lite0"], default="tiny")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-queries", type=int, default=640)
    ap.add_argument("--skip-queries", action="store_true", help="throughput only")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    model, x, y = load(args.model, args.images, args.device)
    report: dict = {"model": args.model, "images": len(x), "device": args.device}

    eps = 8 / 255
    sweep_eps = [1 / 255, 2 / 255, 4 / 255, 8 / 255]  # params.yaml's sweep, eps 0 left out

    def pgd(early_stop: bool):
        return PGD(eps=eps, steps=10, step_size=2 / 255, seed=0, early_stop=early_stop)

    # name -> (ours, torchattacks, torchattacks + the forward pass that tells success)
    pairs = {
        "fgsm": (
            lambda: FGSM(eps=eps)(model, x, y),
            lambda: torchattacks.FGSM(model, eps=eps)(x, y),
        ),
        "fgsm_sweep4": (
            lambda: sweep(model, x, y, [FGSM(eps=e) for e in sweep_eps]),
            lambda: [torchattacks.FGSM(model, eps=e)(x, y) for e in sweep_eps],
        ),
        "pgd10": (
            lambda: pgd(early_stop=False)(model, x, y),
            lambda: torchattacks.PGD(model, eps=eps, alpha=2 / 255, steps=10)(x, y),
        ),
        "pgd10_early_stop": (
            lambda: pgd(early_stop=True)(model, x, y),
            lambda: torchattacks.PGD(model, eps=eps, alpha=2 / 255, steps=10)(x, y),
        ),
    }
    for key, early_stop in (("pgd10", False), ("pgd10_early_stop", True)):
        ours_acc = 1 - pgd(early_stop)(model, x, y).success_rate
        ref_acc = 1 - fooled(model, pairs[key][1](), y)
        report[f"{key}_robust_accuracy"] = {"ours": ours_acc, "torchattacks": ref_acc}
        print(f"{key}: robust accuracy ours {ours_acc:.3f}, torchattacks {ref_acc:.3f}")
    for name, (ours, ref) in pairs.items():

        def ref_checked(ref=ref):
            adv = ref()
            return [fooled(model, a, y) for a in (adv if isinstance(adv, list) else [adv])]

        ours(), ref()  # warm-up
        times: dict[str, list[float]] = {"ours": [], "torchattacks": [], "checked": []}
        for _ in range(args.repeats):  # interleaved, so load drifts hit all three alike
            for key, fn in (("ours", ours), ("torchattacks", ref), ("checked", ref_checked)):
                times[key].append(best_time(fn, 1))
        t_ours, t_ref, t_chk = (min(times[k]) for k in ("ours", "torchattacks", "checked"))
        report[f"{name}_seconds"] = {"ours": t_ours, "torchattacks": t_ref, "checked": t_chk}
        report[f"{name}_throughput_ratio"] = t_ref / t_ours
        report[f"{name}_throughput_ratio_with_success"] = t_chk / t_ours
        print(
            f"{name}: ours {t_ours:.3f}s, torchattacks {t_ref:.3f}s (ratio {t_ref / t_ours:.2f}), "
            f"torchattacks + success check {t_chk:.3f}s (ratio {t_chk / t_ours:.2f})"
        )

    if not args.skip_queries:
        for e in (4 / 255, 8 / 255):
            tag = f"eps_{e * 255:g}"
            sq = Square(eps=e, max_queries=args.max_queries, seed=0)(model, x, y)
            nes = NES(eps=e, max_queries=args.max_queries, seed=0)(model, x, y)

            def ta_square(budget: int, e=e):
                return torchattacks.Square(model, eps=e, n_queries=budget, p_init=0.05, seed=0)(
                    x, y
                )

            report[f"queries_to_50pct_{tag}"] = {
                "square_ours": median_queries(sq.queries, sq.success),
                "square_torchattacks_budget": budget_to_half(model, y, ta_square, args.max_queries),
                "square_art_budget": budget_to_half(
                    model, y, art_square(model, x, y, e), args.max_queries
                ),
                "nes_ours": median_queries(nes.queries, nes.success),
                "square_success_ours": sq.success_rate,
                "nes_success_ours": nes.success_rate,
            }
            print(tag, report[f"queries_to_50pct_{tag}"])
    if not args.skip_queries:
        report["hopskipjump"] = hopskipjump_vs_foolbox(model, x, y)
        print("hopskipjump", report["hopskipjump"])
    print(json.dumps(report, indent=2, default=str))


def budget_to_half(model, y, run, max_queries: int) -> float:
    """The smallest doubling budget (10, 20, 40...) at which ``run(budget)``'s adversarials fool
    at least half the images; libraries that report no per-image counts are measured so."""
    budget = 10
    while budget <= max_queries:
        if fooled(model, run(budget), y) >= 0.5:
            return budget
        budget *= 2
    return math.inf


def art_square(model, x, y, eps: float):
    """ART's SquareAttack (L-inf, one restart, the same p_init) as ``run(budget) -> x_adv``."""
    import numpy as np
    from art.attacks.evasion import SquareAttack
    from art.estimators.classification import PyTorchClassifier

    with torch.no_grad():
        n_classes = model(x[:1]).shape[1]
    clf = PyTorchClassifier(
        model=model,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=n_classes,
        clip_values=(0.0, 1.0),
        device_type="gpu" if x.is_cuda else "cpu",
    )
    x_np, y_np = x.cpu().numpy(), y.cpu().numpy()

    def run(budget: int) -> torch.Tensor:
        attack = SquareAttack(
            clf, norm=np.inf, eps=eps, max_iter=budget, p_init=0.05, nb_restarts=1, verbose=False
        )
        return torch.from_numpy(attack.generate(x_np, y_np)).to(x.device)

    return run


def noise_starts(model, x, y, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform noise images the model labels differently from y (up to 1,000 draws each)."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    starts, found = x.clone(), torch.zeros(len(x), dtype=torch.bool)
    with torch.no_grad():
        for _ in range(1000):
            if found.all():
                break
            z = torch.rand(x.shape, generator=g, device=x.device)
            hit = (model(z).argmax(1) != y) & ~found.to(x.device)
            starts[hit], found[hit.cpu()] = z[hit], True
    return starts, found


def hopskipjump_vs_foolbox(model, x, y, budget: int = 1000) -> dict:
    import foolbox

    from transferlab.attacks import HopSkipJump
    from transferlab.attacks.decision import THETA_FLOOR

    starts, found = noise_starts(model, x, y)
    x, y, starts = x[found], y[found], starts[found]
    calls = {"n": 0}

    class Counted(torch.nn.Module):
        def forward(self, z):
            calls["n"] += z.shape[0]
            return model(z)

    fmodel = foolbox.PyTorchModel(Counted().eval(), bounds=(0, 1))
    steps, fb_dist = 1, None
    while steps <= 64:  # the fewest foolbox iterations that spend the budget
        calls["n"] = 0
        attack = foolbox.attacks.HopSkipJumpAttack(steps=steps, constraint="linf")
        raw, _, _ = attack(fmodel, x, y, epsilons=[None], starting_points=starts)
        fb_queries = calls["n"] / len(x)
        fb_dist = (raw[0] - x).flatten(1).abs().amax(1)
        if fb_queries >= budget:
            break
        steps *= 2

    def ours(**kw) -> torch.Tensor:
        res = HopSkipJump(eps=1.0, max_queries=budget, seed=0, **kw)(model, x, y)
        d = (res.x_adv - x).flatten(1).abs().amax(1)
        return torch.where(res.success, d, torch.inf)

    batch_start = ours()
    return {
        "images": len(x),
        "theta_floor": THETA_FLOOR,
        "foolbox_steps": steps,
        "foolbox_queries_per_image": fb_queries,
        "foolbox_median_linf_255": float(fb_dist.median() * 255),
        "ours_batch_start_median_linf_255": float(batch_start.median() * 255),
        "ours_queries_per_image": budget,
    }


if __name__ == "__main__":
    main()
