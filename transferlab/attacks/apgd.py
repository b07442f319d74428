"""Auto-PGD (Croce & Hein, ICML 2020): PGD without a step size to tune.

APGD starts at step ``2 * eps``, adds momentum (0.75) and halves an image's step whenever its loss
stopped rising at a checkpoint, restarting it from its best point. The checkpoints follow the
paper: the first after 22% of the steps, then closer together (by 3%) down to 6%. ``APGD`` with
the cross-entropy loss is AutoAttack's APGD-CE; ``APGDT`` runs the targeted DLR loss against each
image's 2nd..(n+1)th most likely classes (APGD-T). Both follow the reference implementation
(``autoattack/autopgd_pt.py``, cross-checked in tests/unit/attacks/test_autoattack.py) with one
addition: ``early_stop`` takes an image out of the loop at its first fooling iterate, which
changes no verdict (any fooling iterate counts, as in the reference) and saves the later steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transferlab.attacks.base import Attack, Candidates, project

# The reference's constants: momentum, and where the step-size checkpoints fall.
_MOMENTUM = 0.75
_FIRST_CHECK, _MIN_CHECK, _CHECK_DECAY = 0.22, 0.06, 0.03


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """(N,) Difference-of-logits-ratio loss (untargeted), scale- and shift-invariant in the logits.

    ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)`` with ``z_pi`` sorted descending; needs K >= 3.
    """
    z, _ = logits.sort(dim=1)
    true = logits.gather(1, y[:, None]).squeeze(1)
    top_is_y = (logits.argmax(1) == y).float()
    other = z[:, -2] * top_is_y + z[:, -1] * (1 - top_is_y)
    return -(true - other) / (z[:, -1] - z[:, -3] + 1e-12)


def targeted_dlr_loss(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    """(N,) Targeted DLR: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``; needs K >= 4."""
    z, _ = logits.sort(dim=1)
    true = logits.gather(1, y[:, None]).squeeze(1)
    aim = logits.gather(1, target[:, None]).squeeze(1)
    return -(true - aim) / (z[:, -1] - 0.5 * z[:, -3] - 0.5 * z[:, -4] + 1e-12)


class APGD(Attack):
    """APGD, L-inf, on the cross-entropy (APGD-CE) or the DLR loss (APGD-DLR).

    Args:
        eps: L-inf budget in pixel space.
        targeted: if True, ``y`` holds targets and the cross-entropy to them is minimised.
        steps: iterations per restart (the reference and AutoAttack use 100).
        restarts: runs from fresh random starts, each on the images not fooled yet.
        loss: "ce" or "dlr" (untargeted only; needs >= 3 classes).
        rho: a checkpoint halves an image's step if fewer than this fraction of the steps since
            the last one raised its loss.
        seed: seeds the random starts; None uses torch's global RNG.
        early_stop: an image leaves the loop at its first fooling iterate.
    """

    name = "apgd"

    def __init__(
        self,
        *,
        eps: float,
        targeted: bool = False,
        steps: int = 100,
        restarts: int = 1,
        loss: str = "ce",
        rho: float = 0.75,
        seed: int | None = 0,
        early_stop: bool = True,
    ):
        super().__init__(eps=eps, targeted=targeted)
        if steps < 1 or restarts < 1:
            raise ValueError(f"steps and restarts must be >= 1, got {steps} and {restarts}")
        if loss not in ("ce", "dlr"):
            raise ValueError(f"unknown loss {loss!r}; allowed values are ['ce', 'dlr']")
        if loss == "dlr" and targeted:
            raise ValueError("the DLR loss is untargeted here; use APGDT for targeted DLR")
        if not 0 < rho <= 1:
            raise ValueError(f"rho must be in (0, 1], got {rho}")
        self.steps, self.restarts, self.loss, self.rho = int(steps), int(restarts), loss, rho
        self.seed = seed
        self.early_stop = bool(early_stop)

    def _losses(self, logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        """(N,) per-image loss to ascend."""
        if self.loss == "dlr":
            return dlr_loss(logits, y)
        ce = F.cross_entropy(logits, y, reduction="none")
        return -ce if self.targeted else ce

    def _generator(self, x: Tensor) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=x.device).manual_seed(self.seed)

    def run(self, model: nn.Module, x: Tensor, y: Tensor) -> Candidates:
        """All restarts; each runs on the images no earlier restart fooled."""
        found = Candidates.unevaluated(x.clone())
        self._restarts(model, x, y, None, found, self._generator(x))
        return found

    def _restarts(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        found: Candidates,
        generator: torch.Generator | None,
    ) -> None:
        """Run the restarts on the rows of ``found`` not yet known to fool, filling it in."""
        for _ in range(self.restarts):
            todo = (~found.known).nonzero().squeeze(1)
            if todo.numel() == 0:
                return
            sub = self._single_run(
                model,
                x[todo],
                y[todo],
                None if target is None else target[todo],
                generator,
            )
            rows = todo[sub.known]
            if rows.numel():
                if found.logits is None:
                    found.logits = sub.logits.new_zeros(x.shape[0], sub.logits.shape[1])
                found.x_adv[rows] = sub.x_adv[sub.known]
                found.logits[rows] = sub.logits[sub.known]
                found.known[rows] = True

    def _single_run(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Candidates:
        """One APGD run from a random start. Returns the fooling iterates (``known`` rows, with
        their logits); other rows hold their highest-loss iterate."""
        n = x.shape[0]
        out = Candidates(x.clone(), None, torch.zeros(n, dtype=torch.bool, device=x.device))
        eps = self.eps
        check = max(int(_FIRST_CHECK * self.steps), 1)
        min_check = max(int(_MIN_CHECK * self.steps), 1)
        decay = max(int(_CHECK_DECAY * self.steps), 1)

        # The reference's start: uniform noise rescaled so its largest pixel sits at eps.
        t = 2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1
        t = t / t.flatten(1).abs().amax(1).view(-1, 1, 1, 1)
        x_adv = (x + eps * t).clamp(0.0, 1.0)

        def gradient(xs: Tensor, ys: Tensor, ts: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
            xs = xs.detach().requires_grad_(True)
            logits = model(xs).float()
            losses = self._losses(logits, ys, ts)
            (grad,) = torch.autograd.grad(losses.sum(), xs)
            return grad.detach(), logits.detach(), losses.detach()

        rows = torch.arange(n, device=x.device)  # batch positions still descending
        x0, ys, ts = x, y, target
        grad, logits, losses = gradient(x_adv, ys, ts)
        state = {
            "x_adv": x_adv,
            "x_old": x_adv.clone(),
            "x_best": x_adv.clone(),
            "grad": grad,
            "grad_best": grad.clone(),
            "loss_best": losses.clone(),
            "loss_last_check": losses.clone(),
            "reduced_last": torch.ones(n, dtype=torch.bool, device=x.device),
            "step": torch.full((n, 1, 1, 1), 2 * eps, device=x.device),
            "history": torch.zeros(self.steps, n, device=x.device),
        }
        since_check = 0
        for i in range(self.steps + 1):
            fooled = self._adversarial(logits.argmax(1), ys)
            if fooled.any():
                if out.logits is None:
                    out.logits = logits.new_zeros(n, logits.shape[1])
                new = fooled & ~out.known[rows]
                out.x_adv[rows[new]] = state["x_adv"][new]
                out.logits[rows[new]] = logits[new]
                out.known[rows[new]] = True
                if self.early_stop:
                    keep = ~fooled
                    rows, x0, ys = rows[keep], x0[keep], ys[keep]
                    ts = None if ts is None else ts[keep]
                    state = {
                        k: (v[:, keep] if k == "history" else v[keep]) for k, v in state.items()
                    }
                    if rows.numel() == 0:
                        return out
            if i == self.steps:
                break
            s = state
            # Step with momentum: the reference's two projections (plain step, then the mix).
            a = _MOMENTUM if i > 0 else 1.0
            z = project(x0, s["x_adv"] + s["step"] * s["grad"].sign(), eps=eps, norm="linf")
            x_new = s["x_adv"] + (z - s["x_adv"]) * a + (s["x_adv"] - s["x_old"]) * (1 - a)
            x_new = project(x0, x_new, eps=eps, norm="linf")
            s["x_old"], s["x_adv"] = s["x_adv"], x_new
            s["grad"], logits, losses = gradient(x_new, ys, ts)
            s["history"][i] = losses
            better = losses > s["loss_best"]
            s["x_best"][better] = x_new[better]
            s["grad_best"][better] = s["grad"][better]
            s["loss_best"] = torch.where(better, losses, s["loss_best"])
            since_check += 1
            if since_check == check:
                # Oscillation: the loss rose in at most rho of the last `check` steps (the
                # reference compares the first of them with row -1, still zero: kept as is).
                rises = sum(
                    (s["history"][i - j] > s["history"][i - j - 1]).float() for j in range(check)
                )
                reduce = rises <= check * self.rho
                stalled = ~s["reduced_last"] & (s["loss_last_check"] >= s["loss_best"])
                reduce = reduce | stalled
                s["reduced_last"], s["loss_last_check"] = reduce, s["loss_best"].clone()
                if reduce.any():
                    s["step"][reduce] /= 2
                    s["x_adv"][reduce] = s["x_best"][reduce]
                    s["grad"][reduce] = s["grad_best"][reduce]
                since_check = 0
                check = max(check - decay, min_check)
        out.x_adv[rows] = state["x_best"]
        return out


class APGDT(APGD):
    """APGD-T: APGD on the targeted DLR loss, once per target class, untargeted success.

    For each of the ``n_target_classes`` classes the model ranks 2nd, 3rd, ... on the clean
    image, one APGD run pushes the logit of that class above the true one; an image counts as
    fooled by any of them. As in AutoAttack's standard version, one restart per target.

    Args:
        eps, steps, restarts, rho, seed, early_stop: see ``APGD``.
        n_target_classes: how many of the top classes to aim at (capped at K - 1).
    """

    name = "apgd_t"

    def __init__(
        self,
        *,
        eps: float,
        targeted: bool = False,
        steps: int = 100,
        restarts: int = 1,
        n_target_classes: int = 9,
        rho: float = 0.75,
        seed: int | None = 0,
        early_stop: bool = True,
    ):
        if targeted:
            raise ValueError("APGD-T picks its own targets and judges success untargeted")
        super().__init__(
            eps=eps, steps=steps, restarts=restarts, rho=rho, seed=seed, early_stop=early_stop
        )
        if n_target_classes < 1:
            raise ValueError(f"n_target_classes must be >= 1, got {n_target_classes}")
        self.n_target_classes = int(n_target_classes)

    def _losses(self, logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        if logits.shape[1] < 4:
            # DLR-T's denominator needs a 4th logit; with fewer classes ascend the raw margin.
            aim = logits.gather(1, target[:, None]) - logits.gather(1, y[:, None])
            return aim.squeeze(1)
        return targeted_dlr_loss(logits, y, target)

    def run(self, model: nn.Module, x: Tensor, y: Tensor) -> Candidates:
        with torch.no_grad():
            ranked = model(x).float().argsort(dim=1, descending=True)
        found = Candidates.unevaluated(x.clone())
        generator = self._generator(x)
        for rank in range(1, min(self.n_target_classes, ranked.shape[1] - 1) + 1):
            self._restarts(model, x, y, ranked[:, rank], found, generator)
        return found
