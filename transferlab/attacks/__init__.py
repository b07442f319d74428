"""Adversarial attacks in pixel space: images in [0, 1], models normalise inside.

Like foolbox, hyperparameters go to the constructor and the model to the call::

    attack = make_attack("pgd", eps=8 / 255, steps=10)
    result = attack(model.eval(), x01, y)   # AttackResult
    robust_accuracy = 1 - result.success.float().mean()

White-box attacks (``gradient``) are configurations of one projected-gradient loop; black-box
attacks (``blackbox``) only ever see a counted ``predict(x) -> scores`` oracle, and the
decision-based one (``decision``) reads only the top-1 label of each answer.
"""

from transferlab.attacks.apgd import APGD, APGDT
from transferlab.attacks.autoattack import AutoAttack
from transferlab.attacks.base import Attack, AttackResult, project
from transferlab.attacks.blackbox import (
    BLACKBOX_ATTACKS,
    NES,
    SPSA,
    BlackBoxAttack,
    QueryBudgetExceeded,
    ScoreGradient,
    ScoreOracle,
    Square,
)
from transferlab.attacks.decision import HopSkipJump
from transferlab.attacks.fab import FABT
from transferlab.attacks.gradient import (
    ATTACKS,
    BIM,
    FGSM,
    MIFGSM,
    PGD,
    PGDL2,
    ProjectedGradient,
    make_attack,
    sweep,
)

# One registry for make_attack; black-box classes live in their own module.
# HopSkipJump only queries the model too: a black-box attack for the sanity checks and reports.
BLACKBOX_ATTACKS["hopskipjump"] = HopSkipJump
ATTACKS.update(BLACKBOX_ATTACKS)
# AutoAttack's parts and the ensemble (white-box: its gradient attacks run first).
ATTACKS.update({"apgd": APGD, "apgd_t": APGDT, "fab_t": FABT, "autoattack": AutoAttack})

__all__ = [
    "APGD",
    "APGDT",
    "ATTACKS",
    "FABT",
    "AutoAttack",
    "BIM",
    "BLACKBOX_ATTACKS",
    "FGSM",
    "HopSkipJump",
    "MIFGSM",
    "NES",
    "PGD",
    "PGDL2",
    "SPSA",
    "Attack",
    "AttackResult",
    "BlackBoxAttack",
    "ProjectedGradient",
    "QueryBudgetExceeded",
    "ScoreGradient",
    "ScoreOracle",
    "Square",
    "make_attack",
    "project",
    "sweep",
]
