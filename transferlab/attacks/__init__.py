"""Adversarial attacks in pixel space: images in [0, 1], models normalise inside.

Like foolbox, hyperparameters go to the constructor and the model to the call::

    attack = make_attack("pgd", eps=8 / 255, steps=10)
    result = attack(model.eval(), x01, y)   # AttackResult
    robust_accuracy = 1 - result.success.float().mean()
"""

from transferlab.attacks.base import Attack, AttackResult, project
from transferlab.attacks.gradient import (
    ATTACKS,
    BIM,
    FGSM,
    PGD,
    PGDL2,
    ProjectedGradient,
    make_attack,
)

__all__ = [
    "ATTACKS",
    "BIM",
    "FGSM",
    "PGD",
    "PGDL2",
    "Attack",
    "AttackResult",
    "ProjectedGradient",
    "make_attack",
    "project",
]
