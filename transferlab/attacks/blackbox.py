"""Score-based black-box attacks: they see only ``predict(x) -> scores``, never the model.

``BlackBoxAttack.run`` is final (a subclass that overrides it fails at class creation): it wraps
the model in a ``ScoreOracle`` and hands only that oracle to ``search``. The oracle evaluates
under ``torch.no_grad`` and returns detached scores, so no autograd graph leads back to the model,
and it counts every query per image against a hard budget (``QueryBudgetExceeded`` past it).

Scores are log-probabilities (``log_softmax`` of the logits): what a prediction API returns,
in log space so that confident predictions do not underflow to 0. Margins of log-probabilities
equal margins of logits, so the margin losses below are the ones of the papers.

Attacks:
    * ``Square``: Square Attack, L-inf (Andriushchenko et al., 2020).
    * ``NES``: natural-evolution-strategies gradient estimate + sign steps (Ilyas et al., 2018).
    * ``SPSA``: simultaneous-perturbation gradient estimate + Adam (Uesato et al., 2018).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transferlab.attacks.base import Attack, project

__all__ = [
    "NES",
    "SPSA",
    "BlackBoxAttack",
    "QueryBudgetExceeded",
    "ScoreGradient",
    "ScoreOracle",
    "Square",
    "margin",
]


class QueryBudgetExceeded(RuntimeError):
    """An attack asked for more queries on an image than its budget allows."""


class ScoreOracle:
    """The only view of the model a black-box attack gets.

    ``oracle(x, index)`` returns (M, K) log-probabilities for M candidate images; ``index`` (M,)
    names the original image each candidate belongs to (repeats allowed: one query each).

    Attributes:
        budget: maximum queries per image.
        used: (N,) int64 queries spent so far per image.
    """

    __slots__ = ("_query", "budget", "used")

    def __init__(self, query: Callable[[Tensor, Tensor], Tensor], n: int, budget: int, device):
        self._query = query
        self.budget = int(budget)
        self.used = torch.zeros(n, dtype=torch.int64, device=device)

    def remaining(self) -> Tensor:
        """(N,) queries left per image."""
        return self.budget - self.used

    def __call__(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        if index is None:
            if x.shape[0] != self.used.shape[0]:
                raise ValueError(f"a query on {x.shape[0]} of {len(self.used)} images needs index")
            index = torch.arange(x.shape[0], device=x.device)
        after = self.used.index_add(0, index, torch.ones_like(index, dtype=torch.int64))
        if (after > self.budget).any():
            raise QueryBudgetExceeded(
                f"query budget of {self.budget} per image exceeded on images "
                f"{torch.nonzero(after > self.budget).flatten()[:5].tolist()}"
            )
        self.used = after
        with torch.no_grad():
            return self._query(x.detach(), index).detach()


def margin(scores: Tensor, y: Tensor, *, targeted: bool) -> Tensor:
    """(M,) margin to success; <= 0 means the candidate already succeeds.

    Untargeted: ``s_y - max_{j != y} s_j``. Targeted: ``max_{j != t} s_j - s_t``.
    """
    true = scores.gather(1, y[:, None]).squeeze(1)
    other = scores.masked_fill(F.one_hot(y, scores.shape[1]).bool(), -torch.inf).amax(1)
    return other - true if targeted else true - other


class BlackBoxAttack(Attack):
    """Base of score-based attacks: ``search(predict, x, y)`` with a counted, budgeted oracle.

    Args:
        eps: L-inf budget in pixel space.
        targeted: if True, ``y`` holds target classes.
        max_queries: query budget per image (>= 1), the clean query included.
        seed: seeds the attack's randomness; None uses torch's global RNG.
    """

    name: ClassVar[str] = "blackbox"
    # Inference-only callers could be checked: attacks never need the model's gradients.
    needs_gradients: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "run" in vars(cls):
            raise TypeError(
                f"{cls.__name__} overrides run(); black-box attacks implement search(predict, "
                "x, y) so they never hold the model"
            )

    def __init__(
        self, *, eps: float, targeted: bool = False, max_queries: int, seed: int | None = None
    ):
        super().__init__(eps=eps, targeted=targeted)
        if max_queries < 1:
            raise ValueError(f"max_queries must be >= 1, got {max_queries}")
        self.max_queries = int(max_queries)
        self.seed = seed

    def run(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Wrap ``model`` (the base's call counter) in a ``ScoreOracle`` and search."""

        def query(candidates: Tensor, index: Tensor) -> Tensor:
            return F.log_softmax(model(candidates, index=index).float(), dim=1)

        oracle = ScoreOracle(query, x.shape[0], self.max_queries, x.device)
        generator = torch.Generator(device=x.device)
        generator.manual_seed(
            self.seed if self.seed is not None else int(torch.randint(2**62, (1,)))
        )
        return self.search(oracle, x, y, generator)

    def search(
        self, predict: ScoreOracle, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> Tensor:
        """Find adversarial images with queries only. Implemented by subclasses.

        Args:
            predict: counted oracle, (M, C, H, W) in [0, 1] (+ (M,) image index) -> (M, K)
                log-probabilities without gradients.
            x: (N, C, H, W) clean images in [0, 1]. y: (N,) labels or targets.
            generator: the attack's random generator (seeded).

        Returns:
            (N, C, H, W) candidates inside the eps-ball.
        """
        raise NotImplementedError

    def _margin(self, scores: Tensor, y: Tensor) -> Tensor:
        return margin(scores, y, targeted=self.targeted)


def _random_sign(shape: tuple[int, ...], generator: torch.Generator, device) -> Tensor:
    return torch.randint(0, 2, shape, generator=generator, device=device).float() * 2 - 1


class Square(BlackBoxAttack):
    """Square Attack, L-inf (Andriushchenko et al., ECCV 2020), as in the authors' code.

    Starts from vertical stripes of +-eps, then each iteration redraws one square window (the
    same position for the batch, +-eps per image and channel) and keeps it where the margin loss
    drops. The window's area fraction ``p`` halves on the paper's schedule, rescaled to the
    budget. One query per image for the clean check (images already misclassified stop there),
    one for the stripes, one per iteration.

    Args:
        eps, targeted, max_queries, seed: see ``BlackBoxAttack``.
        p_init: initial fraction of pixels in the window (the paper uses 0.05 for ImageNet).
    """

    name = "square"

    def __init__(
        self,
        *,
        eps: float,
        targeted: bool = False,
        max_queries: int = 100,
        p_init: float = 0.05,
        seed: int | None = None,
    ):
        super().__init__(eps=eps, targeted=targeted, max_queries=max_queries, seed=seed)
        if not 0 < p_init <= 1:
            raise ValueError(f"p_init must be in (0, 1], got {p_init}")
        self.p_init = float(p_init)

    def _p(self, it: int) -> float:
        """The paper's piecewise-constant schedule on a 10,000-query scale."""
        it = int(it / max(self.max_queries, 1) * 10_000)
        bounds = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
        halvings = sum(it > b for b in bounds)
        return self.p_init / 2**halvings

    def search(self, predict, x, y, generator):
        n, c, h, w = x.shape
        best_margin = self._margin(predict(x), y)
        x_best = x.clone()
        todo = best_margin > 0
        if self.max_queries < 2 or not todo.any():
            return x_best
        idx = torch.nonzero(todo).flatten()
        stripes = self.eps * _random_sign((len(idx), c, 1, w), generator, x.device)
        x_init = (x[idx] + stripes).clamp(0, 1)
        best_margin[idx] = self._margin(predict(x_init, idx), y[idx])
        x_best[idx] = x_init
        for it in range(self.max_queries - 2):
            active = torch.nonzero(best_margin > 0).flatten()
            if not len(active):
                break
            s = min(max(round(math.sqrt(self._p(it) * h * w)), 1), h - 1, w - 1)
            top = int(torch.randint(0, h - s + 1, (1,), generator=generator, device=x.device))
            left = int(torch.randint(0, w - s + 1, (1,), generator=generator, device=x.device))
            clean = x[active]
            delta = x_best[active] - clean
            window = self.eps * _random_sign((len(active), c, 1, 1), generator, x.device)
            delta[:, :, top : top + s, left : left + s] = window
            candidate = (clean + delta).clamp(0, 1)
            m = self._margin(predict(candidate, active), y[active])
            improved = m < best_margin[active]
            best_margin[active] = torch.where(improved, m, best_margin[active])
            x_best[active[improved]] = candidate[improved]
        return x_best


class ScoreGradient(BlackBoxAttack):
    """Projected gradient ascent on a finite-difference gradient estimate from scores only.

    Each iteration spends ``2 * samples`` queries per image on antithetic pairs
    ``x +- sigma * u`` and one to check the new point:
    ``g = mean_i (L(x + sigma u_i) - L(x - sigma u_i)) / (2 sigma) * u_i`` with the loss
    ``L = -margin`` (the CW margin loss on log-probabilities). NES and SPSA are configurations.

    Args:
        eps, targeted, max_queries, seed: see ``BlackBoxAttack``.
        samples: antithetic pairs per gradient estimate.
        sigma: finite-difference scale in pixel units.
        distribution: "gaussian" (NES) or "rademacher" (SPSA) directions u.
        update: "sign" (projected sign step, as NES-PGD) or "adam" (SPSA).
        step_size: sign-step size or Adam learning rate, in pixels; default eps / 4 (Adam's
            normalised first steps move about one learning rate per pixel, like a sign step).
    """

    name = "score_gradient"

    def __init__(
        self,
        *,
        eps: float,
        targeted: bool = False,
        max_queries: int = 200,
        samples: int = 10,
        sigma: float = 1e-3,
        distribution: str = "gaussian",
        update: str = "sign",
        step_size: float | None = None,
        seed: int | None = None,
    ):
        super().__init__(eps=eps, targeted=targeted, max_queries=max_queries, seed=seed)
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if distribution not in ("gaussian", "rademacher"):
            raise ValueError(
                f"distribution must be 'gaussian' or 'rademacher', not {distribution!r}"
            )
        if update not in ("sign", "adam"):
            raise ValueError(f"update must be 'sign' or 'adam', not {update!r}")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        self.samples = int(samples)
        self.sigma = float(sigma)
        self.distribution = distribution
        self.update = update
        self.step_size = self.eps / 4 if step_size is None else float(step_size)

    def _directions(self, shape: tuple[int, ...], generator, device) -> Tensor:
        if self.distribution == "rademacher":
            return _random_sign(shape, generator, device)
        return torch.randn(shape, generator=generator, device=device)

    def search(self, predict, x, y, generator):
        n = x.shape[0]
        x_adv = x.clone()
        best_margin = self._margin(predict(x), y)
        per_step = 2 * self.samples + 1
        # Adam state per image (SPSA); unused for sign steps.
        m1, m2 = torch.zeros_like(x), torch.zeros_like(x)
        steps = torch.zeros(n, device=x.device)
        while True:
            active = torch.nonzero((best_margin > 0) & (predict.remaining() >= per_step)).flatten()
            if not len(active):
                break
            k, shape = len(active), x.shape[1:]
            point = x_adv[active]
            u = self._directions((k, self.samples, *shape), generator, x.device)
            candidates = torch.cat(
                [point[:, None] + self.sigma * u, point[:, None] - self.sigma * u], 1
            )
            owner = active.repeat_interleave(2 * self.samples)
            scores = predict(candidates.clamp(0, 1).flatten(0, 1), owner)
            loss = -self._margin(scores, y[owner]).view(k, 2, self.samples)
            coef = (loss[:, 0] - loss[:, 1]) / (2 * self.sigma)
            grad = (coef.view(k, self.samples, *[1] * len(shape)) * u).mean(1)
            if self.update == "sign":
                point = point + self.step_size * grad.sign()
            else:
                steps[active] += 1
                t = steps[active].view(-1, *[1] * len(shape))
                m1[active] = 0.9 * m1[active] + 0.1 * grad
                m2[active] = 0.999 * m2[active] + 0.001 * grad**2
                m_hat, v_hat = m1[active] / (1 - 0.9**t), m2[active] / (1 - 0.999**t)
                point = point + self.step_size * m_hat / (v_hat.sqrt() + 1e-8)
            point = project(x[active], point, eps=self.eps, norm="linf")
            x_adv[active] = point
            best_margin[active] = self._margin(predict(point, active), y[active])
        return x_adv


class NES(ScoreGradient):
    """NES gradient estimate (Gaussian antithetic samples) with projected sign steps."""

    name = "nes"

    def __init__(
        self,
        *,
        eps: float,
        targeted: bool = False,
        max_queries: int = 200,
        samples: int = 10,
        sigma: float = 1e-3,
        step_size: float | None = None,
        seed: int | None = None,
    ):
        super().__init__(
            eps=eps,
            targeted=targeted,
            max_queries=max_queries,
            samples=samples,
            sigma=sigma,
            distribution="gaussian",
            update="sign",
            step_size=step_size,
            seed=seed,
        )


class SPSA(ScoreGradient):
    """SPSA (Rademacher +-1 perturbations) with Adam steps, as in Uesato et al. (2018)."""

    name = "spsa"

    def __init__(
        self,
        *,
        eps: float,
        targeted: bool = False,
        max_queries: int = 200,
        samples: int = 10,
        sigma: float = 0.01,
        step_size: float | None = None,
        seed: int | None = None,
    ):
        super().__init__(
            eps=eps,
            targeted=targeted,
            max_queries=max_queries,
            samples=samples,
            sigma=sigma,
            distribution="rademacher",
            update="adam",
            step_size=step_size,
            seed=seed,
        )


BLACKBOX_ATTACKS: dict[str, type[Attack]] = {"square": Square, "nes": NES, "spsa": SPSA}
