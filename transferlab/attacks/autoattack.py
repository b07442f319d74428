"""AutoAttack, standard version (Croce & Hein, ICML 2020): the ensemble RobustBench reports.

APGD-CE, then APGD-T, then FAB-T, then Square, each run only on the images every earlier attack
left standing; an image is robust only if all four fail. This is the reference's
``run_standard_evaluation`` with our attacks (cross-checked against it in
tests/unit/attacks/test_autoattack.py). The budgets default to the standard version's (100
iterations, 9 targets, 5000 Square queries); params.yaml scales them to what a CPU run affords.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from transferlab.attacks.apgd import APGD, APGDT
from transferlab.attacks.base import Attack, CallCounter, Candidates
from transferlab.attacks.blackbox import Square
from transferlab.attacks.fab import FABT, SelfTargeted


class _Rows(nn.Module):
    """The attacked batch's call counter as seen by an attack on a subset ``rows`` of it."""

    def __init__(self, counter: CallCounter, rows: Tensor):
        super().__init__()
        self.counter, self.rows = counter, rows
        self.train(False)

    def forward(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return self.counter(x)
        if index is None:
            index = torch.arange(x.shape[0], device=x.device)
        return self.counter(x, index=self.rows[index])


class AutoAttack(SelfTargeted):
    """The standard AutoAttack ensemble, L-inf, untargeted.

    Args:
        eps, steps, n_target_classes: as ``SelfTargeted``'s; ``steps`` are APGD-CE's, and
            APGD-T's and FAB-T's per target, ``n_target_classes`` those two's targets.
        square_queries: Square's query budget per image (0 leaves Square out).
        seed: seeds APGD's random starts and Square's sampling.
    """

    name = "autoattack"

    def __init__(
        self,
        *,
        eps: float,
        targeted: bool = False,
        steps: int = 100,
        n_target_classes: int = 9,
        square_queries: int = 5000,
        seed: int | None = 0,
    ):
        # every hyperparameter spelled out: make_attack checks params.yaml's keys against it
        super().__init__(eps=eps, targeted=targeted, steps=steps, n_target_classes=n_target_classes)
        if square_queries < 0:
            raise ValueError(f"square_queries must be >= 0, got {square_queries}")
        self.square_queries, self.seed = int(square_queries), seed

    def components(self) -> list[Attack]:
        """The ensemble's attacks, in the order they run."""
        steps, targets = self.steps, self.n_target_classes
        attacks: list[Attack] = [
            APGD(eps=self.eps, steps=steps, loss="ce", seed=self.seed),
            APGDT(eps=self.eps, steps=steps, n_target_classes=targets, seed=self.seed),
            FABT(eps=self.eps, steps=steps, n_target_classes=targets),
        ]
        if self.square_queries:
            # p_init 0.8: the reference's choice for the ensemble (0.05 is for query efficiency)
            attacks.append(
                Square(eps=self.eps, max_queries=self.square_queries, p_init=0.8, seed=self.seed)
            )
        return attacks

    def run(self, model: nn.Module, x: Tensor, y: Tensor) -> Candidates:
        with torch.no_grad():
            logits = model(x).float()
        # Every row's logits are known throughout: clean ones, then those of its fooling image.
        found = Candidates(x.clone(), logits, torch.ones_like(y, dtype=torch.bool))
        # The success checks of the components are free, as is the final one in Attack.__call__.
        uncounted = model.model if isinstance(model, CallCounter) else model
        standing = logits.argmax(1) == y
        for attack in self.components():
            rows = standing.nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            sub = attack.run(_Rows(model, rows), x[rows], y[rows])
            if not isinstance(sub, Candidates):
                sub = Candidates.unevaluated(sub)
            # Judge each attack on its projected images, as the final check will.
            x_adv, sub_logits = attack._checked(uncounted, x[rows], sub)
            fooled = sub_logits.argmax(1) != y[rows]
            found.x_adv[rows[fooled]] = x_adv[fooled]
            found.logits[rows[fooled]] = sub_logits[fooled]
            standing[rows[fooled]] = False
        return found
