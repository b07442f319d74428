"""Decision-based black-box attack: it reads only the top-1 label of each query.

``HopSkipJump`` (Chen, Jordan and Wainwright, 2020), L-inf version, as in the authors' code and
ART: start from an adversarial point (the nearest image of the batch on the adversarial side,
else uniform noise), walk it to the decision boundary by
binary search, estimate the boundary's normal from the labels of random probes around it,
step along that direction with a geometrically shrinking step until the point is adversarial
again, and repeat. The perturbation shrinks every round; the base class then projects the
result onto the eps-ball, so the attack succeeds on an image when it got within eps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from transferlab.attacks.base import project
from transferlab.attacks.blackbox import BlackBoxAttack, ScoreOracle

__all__ = ["HopSkipJump"]

THETA_FLOOR = 1e-5


class _OutOfQueries(Exception):
    """This image's budget cannot pay for the next step; keep what was found."""


class HopSkipJump(BlackBoxAttack):
    """HopSkipJump, L-inf, untargeted or targeted, using labels only.

    Queries per image: the clean check, up to ``init_tries`` random starts (only when no other
    image of the batch is already on the adversarial side), about
    ``log2(1 / theta)`` per binary search, ``init_evals * sqrt(t)`` probes (capped by
    ``max_evals``) and a few step-size checks per round ``t``. The attack stops on an image
    when the next step would exceed ``max_queries``.

    Args:
        eps, targeted, max_queries, seed: see ``BlackBoxAttack``.
        init_evals: probes of the first gradient estimate (the paper's 100).
        max_evals: most probes per estimate (the paper's 10,000).
        init_tries: random uniform images tried to find an adversarial start.
        gamma: sets the binary-search threshold ``theta = gamma / d**2`` (d: pixels x channels),
            at least ``THETA_FLOOR``.
    """

    name = "hopskipjump"

    def __init__(
        self,
        *,
        eps: float,
        targeted: bool = False,
        max_queries: int = 1000,
        init_evals: int = 100,
        max_evals: int = 10_000,
        init_tries: int = 100,
        gamma: float = 1.0,
        seed: int | None = None,
    ):
        super().__init__(eps=eps, targeted=targeted, max_queries=max_queries, seed=seed)
        for key, value in (("init_evals", init_evals), ("max_evals", max_evals)):
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if init_tries < 1:
            raise ValueError(f"init_tries must be >= 1, got {init_tries}")
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.init_evals = int(init_evals)
        self.max_evals = int(max_evals)
        self.init_tries = int(init_tries)
        self.gamma = float(gamma)

    def search(self, predict: ScoreOracle, x: Tensor, y: Tensor, generator) -> Tensor:
        x_adv = x.clone()
        labels = predict(x).argmax(1)
        fooled = self._adversarial(labels, y)
        for i in torch.nonzero(~fooled).flatten().tolist():
            # Another image of the batch that the clean check already saw on the adversarial
            # side is a free start (the nearest one); random noise only where none is.
            other = self._adversarial(labels, y[i])
            start = None
            if other.any():
                far = (x[other] - x[i]).flatten(1).abs().amax(1)
                start = x[other][far.argmin()]
            x_adv[i] = self._attack_one(predict, x[i], y[i], i, generator, start)
        return x_adv

    # ------------------------------------------------------------------ one image

    def _ask(self, predict: ScoreOracle, candidates: Tensor, y: Tensor, i: int) -> Tensor:
        """(M,) bool: which candidates of image ``i`` are adversarial; labels only."""
        if int(predict.remaining()[i]) < len(candidates):
            raise _OutOfQueries
        index = torch.full((len(candidates),), i, dtype=torch.int64, device=candidates.device)
        return self._adversarial(predict(candidates, index).argmax(1), y)

    def _attack_one(self, predict, x: Tensor, y: Tensor, i: int, generator, start) -> Tensor:
        d = x.numel()
        # The paper's gamma / d**2 is far below 8-bit pixel resolution: each binary search would
        # cost ~35 queries and end so close to the boundary that float rounding decides the
        # label. A floor of 1e-5 (1/400 of a grey level) halves the searches and keeps the
        # returned point on the adversarial side.
        theta = max(self.gamma / d**2, THETA_FLOOR)
        if start is None:
            try:
                start = self._random_start(predict, x, y, i, generator)
            except _OutOfQueries:
                return x
        if start is None:
            return x
        best = self._to_boundary(predict, x, start, y, i, theta)
        dist = float((best - x).abs().max())
        t = 0
        try:
            while dist > 0:
                t += 1
                # Probe radius: the authors' code starts at a tenth of the pixel range, then
                # uses d * theta * dist for L-inf.
                delta = 0.1 if t == 1 else d * theta * dist
                evals = min(int(self.init_evals * math.sqrt(t)), self.max_evals)
                evals = min(evals, int(predict.remaining()[i]) - 1)
                if evals < 2:
                    break
                direction = self._normal(predict, best, y, i, evals, delta, generator).sign()
                step = dist / math.sqrt(t)
                while True:
                    candidate = (best + step * direction).clamp(0, 1)
                    if bool(self._ask(predict, candidate[None], y, i)):
                        break
                    step /= 2
                    if step < theta:
                        raise _OutOfQueries  # no step along the estimate works: stop
                nearer = self._to_boundary(predict, x, candidate, y, i, theta)
                new_dist = float((nearer - x).abs().max())
                if new_dist < dist:
                    best, dist = nearer, new_dist
        except _OutOfQueries:
            pass
        return best

    def _random_start(self, predict, x: Tensor, y: Tensor, i: int, generator) -> Tensor | None:
        for _ in range(self.init_tries):
            noise = torch.rand(x.shape, generator=generator, device=x.device)
            if bool(self._ask(predict, noise[None], y, i)):
                return noise
        return None

    def _to_boundary(self, predict, x: Tensor, adv: Tensor, y: Tensor, i: int, theta: float):
        """The L-inf binary search: the smallest radius r (to ``theta``) at which the
        projection of ``adv`` onto the r-ball around ``x`` is still adversarial."""
        low, high = 0.0, float((adv - x).abs().max())
        # Relative threshold as in the paper's code: stop within theta of the boundary.
        while high - low > theta:
            mid = (low + high) / 2
            try:
                ok = bool(self._ask(predict, project(x, adv, eps=mid, norm="linf")[None], y, i))
            except _OutOfQueries:
                break
            low, high = (low, mid) if ok else (mid, high)
        return project(x, adv, eps=high, norm="linf")

    def _normal(self, predict, boundary, y, i, evals: int, delta: float, generator) -> Tensor:
        """Monte-Carlo estimate of the boundary's normal (pointing to the adversarial side)."""
        u = torch.rand((evals, *boundary.shape), generator=generator, device=boundary.device)
        u = u * 2 - 1
        u = u / u.flatten(1).norm(dim=1).view(-1, *[1] * boundary.dim())
        probes = (boundary + delta * u).clamp(0, 1)
        u = (probes - boundary) / delta  # what was really added after clipping
        sign = self._ask(predict, probes, y, i).float() * 2 - 1
        mean = sign.mean()
        # Baseline: subtracting the mean sign lowers the variance (the paper's Eq. 10), except
        # when every probe agrees and it would cancel everything.
        if abs(float(mean)) < 1:
            sign = sign - mean
        return (sign.view(-1, *[1] * boundary.dim()) * u).mean(0)
