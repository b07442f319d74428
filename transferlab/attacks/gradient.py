"""White-box gradient attacks: one projected-gradient loop, FGSM/BIM/PGD are configurations.

Conventions follow torchattacks (and hence Madry et al.) so results can be cross-checked:
cross-entropy with mean reduction over the batch, sign steps for L-inf, unit-L2-norm steps for
L2, projection onto the eps-ball and [0, 1] after every step, targeted attacks descend the loss
towards the target class.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transferlab.attacks.base import (
    NORMS,
    Attack,
    AttackResult,
    CallCounter,
    Candidates,
    attacking,
    project,
)

log = logging.getLogger(__name__)

# torchattacks' PGDL2 adds this to the gradient norm; same value so the L2 steps agree.
_L2_DIVISION_EPS = 1e-10


class ProjectedGradient(Attack):
    """Projected gradient descent on the cross-entropy loss (Madry et al., 2018).

    Args:
        eps: budget in pixel space: L-inf radius or per-image L2 norm.
        targeted: if True, ``y`` holds targets and the loss is minimised towards them.
        steps: gradient steps per restart (>= 1).
        step_size: absolute step in pixel space (L-inf: per pixel; L2: step norm). Default
            ``2.5 * eps / steps`` as in Madry et al.; it equals torchattacks' defaults
            (eps=8/255, alpha=2/255, steps=10).
        random_start: start uniformly in the L-inf ball, or (L2) at a random direction with a
            radius uniform in [0, eps] as in torchattacks; else start at x.
        restarts: independent runs; per image the first successful run is kept, else the one
            with the highest loss. Each restart after one costs one forward query per image.
        norm: "linf" or "l2".
        seed: seeds the random start for reproducible runs; None uses torch's global RNG.
        momentum: decay factor mu of MI-FGSM (Dong et al., 2018). With mu > 0 the step follows
            ``g <- mu * g + grad / mean|grad|`` (per image) instead of the raw gradient; 0
            (default) is plain PGD.
        early_stop: stop on each image at the first iterate the model gets wrong (targeted:
            classifies as the target), seen in the forward pass the next step needs anyway.
            Later steps then run on the remaining images only, and the success check reuses
            those logits. Robust accuracy can only fall (any fooling iterate counts, as in
            AutoAttack), perturbations are smaller, and on an undefended model most images stop
            after a step or two. Off, every image takes every step, as in torchattacks; crafting
            for transfer wants that (an image barely across the boundary transfers poorly).
    """

    name = "projected_gradient"

    def __init__(
        self,
        *,
        eps: float,
        targeted: bool = False,
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        norm: str = "linf",
        seed: int | None = None,
        momentum: float = 0.0,
        early_stop: bool = False,
    ):
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; allowed values are {list(NORMS)}")
        self.norm = norm
        super().__init__(eps=eps, targeted=targeted)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if restarts < 1:
            raise ValueError(f"restarts must be >= 1, got {restarts}")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        self.steps = int(steps)
        self.step_size = 2.5 * self.eps / self.steps if step_size is None else float(step_size)
        self.random_start = bool(random_start)
        self.restarts = int(restarts)
        self.seed = seed
        if not momentum >= 0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        self.momentum = float(momentum)
        self.early_stop = bool(early_stop)

    def run(self, model: nn.Module, x: Tensor, y: Tensor) -> Candidates:
        """Run the restarts and keep the best per image. Shapes as in ``Attack.run``."""
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=x.device)
            generator.manual_seed(self.seed)
        if self.restarts == 1:
            # Nothing to choose between, so skip the scoring forward pass.
            return self._descend(model, x, y, generator)

        best = x.clone()
        best_logits: Tensor | None = None
        best_loss = torch.full((x.shape[0],), -torch.inf, device=x.device)
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        kept = torch.zeros_like(found)  # rows whose best run (and its logits) is set
        for _ in range(self.restarts):
            # A success found earlier is final, so later restarts only run on the rest.
            todo = (~found).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            run = self._descend(model, x[todo], y[todo], generator)
            logits = run.all_logits(lambda xs, rows, todo=todo: model(xs, index=todo[rows]))
            if best_logits is None:
                best_logits = logits.new_zeros(x.shape[0], logits.shape[1])
            loss = self._signed_loss(logits, y[todo], reduction="none")
            success = self._adversarial(logits.argmax(1), y[todo])
            # otherwise the higher loss (or a success) wins
            better = success | (loss > best_loss[todo])
            rows = todo[better]
            best[rows], best_logits[rows] = run.x_adv[better], logits[better]
            best_loss[rows], kept[rows] = loss[better], True
            found[todo[success]] = True
        return Candidates(best, best_logits, kept)

    def _descend(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None
    ) -> Candidates:
        """One run of the projected-gradient loop from a (random) start, in [0, 1].

        With ``early_stop`` an image leaves the loop at the first iterate that fools the model,
        and its logits from that forward pass come back with it.
        """
        x_adv = self._start(x, generator) if self.random_start else x.clone()
        out = Candidates.unevaluated(x_adv)
        # The images still descending: their batch positions, and compact copies of their state.
        rows = torch.arange(x.shape[0], device=x.device)
        x0, xs, ys, velocity = x, x_adv, y, torch.zeros_like(x)
        for _ in range(self.steps):
            grad, logits = self._loss_gradient(model, xs, ys)
            if self.early_stop:
                done = self._adversarial(logits.argmax(1), ys)
                if done.any():
                    if out.logits is None:
                        out.logits = logits.new_zeros(x.shape[0], logits.shape[1])
                    out.x_adv[rows[done]], out.logits[rows[done]] = xs[done], logits[done]
                    out.known[rows[done]] = True
                    keep = ~done
                    rows, x0, xs, ys, velocity, grad = (
                        t[keep] for t in (rows, x0, xs, ys, velocity, grad)
                    )
                    if rows.numel() == 0:
                        return out
            if self.momentum:
                # L1-normalised per image, as in Dong et al. and torchattacks' MIFGSM, so the
                # accumulated direction is not dominated by one large-gradient step.
                scale = grad.abs().mean(dim=tuple(range(1, grad.dim())), keepdim=True)
                velocity = self.momentum * velocity + grad / scale.clamp_min(1e-12)
                grad = velocity
            xs = project(x0, xs + self.step_size * self._direction(grad), **self._ball())
        out.x_adv[rows] = xs
        return out

    def _ball(self) -> dict[str, float | str]:
        return {"eps": self.eps, "norm": self.norm}

    def _start(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        if self.norm == "linf":
            noise = torch.empty_like(x).uniform_(-self.eps, self.eps, generator=generator)
        else:
            noise = torch.empty_like(x).normal_(generator=generator)
            norms = noise.flatten(1).norm(p=2, dim=1)
            radius = torch.empty_like(norms).uniform_(0, 1, generator=generator) * self.eps
            noise *= (radius / norms).view(-1, *([1] * (x.dim() - 1)))
        return project(x, x + noise, **self._ball())

    def _signed_loss(self, logits: Tensor, y: Tensor, *, reduction: str = "mean") -> Tensor:
        """Cross-entropy to ascend: negated for targeted attacks (move towards the target)."""
        loss = F.cross_entropy(logits.float(), y, reduction=reduction)
        return -loss if self.targeted else loss

    def _loss_gradient(self, model: nn.Module, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """d loss / d x_adv (N, C, H, W), with respect to the input only, and the (N, K) logits
        of the forward pass it took."""
        x_adv = x_adv.detach().requires_grad_(True)
        logits = model(x_adv)
        (grad,) = torch.autograd.grad(self._signed_loss(logits, y), x_adv)
        return grad, logits.detach().float()

    def _direction(self, grad: Tensor) -> Tensor:
        """The steepest-ascent unit step for the norm: sign (L-inf) or unit L2 vector."""
        if self.norm == "linf":
            return grad.sign()
        norms = grad.flatten(1).norm(p=2, dim=1) + _L2_DIVISION_EPS
        return grad / norms.view(-1, *([1] * (grad.dim() - 1)))


class FGSM(ProjectedGradient):
    """Fast gradient sign method (Goodfellow et al., 2015): x' = clip(x + eps * sign(grad)).

    One projected-gradient step of size eps from x, not a separate implementation.
    """

    name = "fgsm"

    def __init__(self, *, eps: float, targeted: bool = False):
        super().__init__(
            eps=eps,
            targeted=targeted,
            steps=1,
            step_size=eps if eps > 0 else None,
            random_start=False,
            restarts=1,
            norm="linf",
        )

    @staticmethod
    def sweep(
        model: nn.Module, x: Tensor, y: Tensor, attacks: Sequence[FGSM]
    ) -> list[AttackResult]:
        """Each of ``attacks`` (any eps, one ``targeted``) on ``(x, y)`` from one gradient.

        FGSM's direction, the sign of the loss gradient at x, does not depend on eps, so a sweep
        over E budgets costs one forward-backward pass and E success checks, not E of each; eps
        0 reuses that pass's logits and costs nothing. The adversarials are bit-identical to
        calling each attack; each result with eps > 0 reports the one (shared) gradient, and
        every result its share of the time. Shapes and errors as in ``Attack.__call__``.
        """
        if len({a.targeted for a in attacks}) > 1:
            raise ValueError("an FGSM sweep needs one `targeted` for all its attacks")
        start = time.perf_counter()
        with attacking(model, x, y) as (x, y):
            counter = CallCounter(model, x.shape[0], x.device)
            clean = Candidates.unevaluated(x)
            grad = None
            if x.shape[0] and any(a.eps > 0 for a in attacks):
                grad, clean.logits = attacks[0]._loss_gradient(counter, x, y)
                clean.known[:] = True
            share = (time.perf_counter() - start) / len(attacks)
            results = []
            for a in attacks:
                began = time.perf_counter() - share
                if a.eps == 0 or grad is None:
                    # as in Attack.__call__, eps 0 takes no gradient: x is its own adversarial
                    found = Candidates(x.clone(), clean.logits, clean.known)
                    idle = CallCounter(model, x.shape[0], x.device)
                    results.append(a.result(model, x, y, found, idle, start=began))
                    continue
                found = Candidates.unevaluated(
                    project(x, x + a.step_size * a._direction(grad), **a._ball())
                )
                results.append(a.result(model, x, y, found, counter, start=began))
        return results


def sweep(model: nn.Module, x: Tensor, y: Tensor, attacks: Sequence[Attack]) -> list[AttackResult]:
    """Each of ``attacks`` on ``(x, y)``, in order; FGSMs that differ only in eps share one
    gradient (``FGSM.sweep``)."""
    fgsm = [a for a in attacks if type(a) is FGSM]
    if len(fgsm) < 2 or len(fgsm) < len(attacks) or len({a.targeted for a in fgsm}) > 1:
        return [a(model, x, y) for a in attacks]
    return FGSM.sweep(model, x, y, fgsm)


class BIM(ProjectedGradient):
    """Basic iterative method / I-FGSM (Kurakin et al., 2017): PGD without a random start."""

    name = "bim"

    def __init__(
        self,
        *,
        eps: float,
        targeted: bool = False,
        steps: int = 10,
        step_size: float | None = None,
        early_stop: bool = False,
    ):
        super().__init__(
            eps=eps,
            targeted=targeted,
            steps=steps,
            step_size=step_size,
            random_start=False,
            restarts=1,
            norm="linf",
            early_stop=early_stop,
        )


class PGD(ProjectedGradient):
    """L-inf PGD with a random start (Madry et al., 2018)."""

    name = "pgd"

    def __init__(
        self,
        *,
        eps: float,
        targeted: bool = False,
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        seed: int | None = None,
        early_stop: bool = False,
    ):
        super().__init__(
            eps=eps,
            targeted=targeted,
            steps=steps,
            step_size=step_size,
            random_start=random_start,
            restarts=restarts,
            norm="linf",
            seed=seed,
            early_stop=early_stop,
        )


class PGDL2(ProjectedGradient):
    """L2 PGD with a random start (Madry et al., 2018); ``eps`` is a per-image L2 norm."""

    name = "pgd_l2"
    norm = "l2"

    def __init__(
        self,
        *,
        eps: float,
        targeted: bool = False,
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        seed: int | None = None,
        early_stop: bool = False,
    ):
        super().__init__(
            eps=eps,
            targeted=targeted,
            steps=steps,
            step_size=step_size,
            random_start=random_start,
            restarts=restarts,
            norm="l2",
            seed=seed,
            early_stop=early_stop,
        )


class MIFGSM(ProjectedGradient):
    """Momentum iterative FGSM (Dong et al., 2018): BIM with an accumulated L1-normalised gradient.

    The momentum stabilises the update direction, which makes the adversarials transfer better
    to other models. Defaults follow the paper: ``mu = 1``, step ``eps / steps``, no random start.
    """

    name = "mifgsm"

    def __init__(
        self,
        *,
        eps: float,
        targeted: bool = False,
        steps: int = 10,
        step_size: float | None = None,
        momentum: float = 1.0,
        seed: int | None = None,
        early_stop: bool = False,
    ):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        super().__init__(
            eps=eps,
            targeted=targeted,
            steps=steps,
            step_size=step_size if step_size is not None or eps == 0 else eps / steps,
            random_start=False,
            restarts=1,
            norm="linf",
            seed=seed,
            momentum=momentum,
            early_stop=early_stop,
        )


ATTACKS: dict[str, type[Attack]] = {
    "fgsm": FGSM,
    "bim": BIM,
    "pgd": PGD,
    "pgd_l2": PGDL2,
    "mifgsm": MIFGSM,
}


def make_attack(name: str, **kwargs: object) -> Attack:
    """Build a registered attack by name.

    Args:
        name: a key of ``ATTACKS`` ("fgsm", "bim", "pgd", "pgd_l2", "mifgsm", and the black-box
            "nes", "spsa", "square" once ``transferlab.attacks`` is imported).
        **kwargs: the attack's keyword-only hyperparameters (``eps`` is required).

    Raises:
        ValueError: on an unknown name or hyperparameter, naming the allowed ones.
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; allowed values are {sorted(ATTACKS)}")
    cls = ATTACKS[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown hyperparameters {unknown} for {name!r}; allowed: {allowed}")
    return cls(**kwargs)
