"""APGD-CE, APGD-T, FAB-T and the AutoAttack ensemble: the attack contract, and agreement with
the reference AutoAttack (PyPI ``pyautoattack``, Croce & Hein's code) on the same model, inputs
and budgets, image by image."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch import Tensor, nn

from tests.unit.attacks.conftest import random_images
from transferlab.attacks import APGD, APGDT, FABT, AutoAttack, make_attack

log = logging.getLogger(__name__)

# Small budgets, the same on both sides: agreement is about the algorithm, not the budget.
BUDGET = {"steps": 20, "square_queries": 100}


def reference_autoattack(
    model: nn.Module, eps: float, *, steps: int, square_queries: int, n_target_classes: int = 9
):
    """The reference ``AutoAttack`` (standard version) with our budgets.

    pyautoattack 0.2.0's FAB imports ``zero_gradients``, which torch removed in 1.9; the shim
    puts back its two lines (detach and zero ``x.grad``) so the reference runs unchanged.
    """
    gradcheck = sys.modules["torch.autograd.gradcheck"]
    if not hasattr(gradcheck, "zero_gradients"):

        def zero_gradients(x: Tensor) -> None:
            if x.grad is not None:
                x.grad.detach_()
                x.grad.zero_()

        gradcheck.zero_gradients = zero_gradients
    from autoattack import AutoAttack as Reference

    device = next(model.parameters()).device
    ref = Reference(model, norm="Linf", eps=eps, version="standard", seed=0, verbose=False)
    ref.device = ref.apgd.device = ref.apgd_targeted.device = ref.fab.device = device
    ref.square.device = device
    ref.apgd.n_iter = ref.apgd_targeted.n_iter = ref.fab.n_iter = steps
    ref.square.n_queries = square_queries
    ref.apgd_targeted.n_target_classes = ref.fab.n_target_classes = n_target_classes
    return ref


def reference_robust(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, budget: dict = BUDGET
) -> Tensor:
    """(N,) bool: images the reference AutoAttack leaves classified correctly."""
    x_adv = reference_autoattack(model, eps, **budget).run_standard_evaluation(x, y, bs=len(x))
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


def agreement_table(ours: Tensor, reference: Tensor, clean: Tensor) -> str:
    """Per image: clean verdict, ours, the reference's (R robust, x fooled, - wrong when clean)."""

    def mark(ok: Tensor, i: int) -> str:
        return "-" if not clean[i] else ("R" if ok[i] else "x")

    lines = ["image  clean  ours  reference  agree"]
    for i in range(len(ours)):
        lines.append(
            f"{i:5d}  {'ok' if clean[i] else 'no':>5}  {mark(ours, i):>4}  "
            f"{mark(reference, i):>9}  {'yes' if ours[i] == reference[i] else 'NO':>5}"
        )
    lines.append(
        f"robust: ours {int(ours.sum())}, reference {int(reference.sum())}, "
        f"agree on {int((ours == reference).sum())}/{len(ours)}"
    )
    return "\n".join(lines)


@pytest.mark.parametrize("name", ["apgd", "apgd_t", "fab_t", "autoattack"])
def test_contract(tiny_cnn: nn.Module, tiny_batch, name: str) -> None:
    x, y = tiny_batch
    eps = 4 / 255
    options = {"autoattack": BUDGET}.get(name, {"steps": 20})
    result = make_attack(name, eps=eps, **options)(tiny_cnn, x, y)
    again = make_attack(name, eps=eps, **options)(tiny_cnn, x, y)
    with torch.no_grad():
        clean = tiny_cnn(x).argmax(1) == y
        pred = tiny_cnn(result.x_adv).argmax(1)
    assert float((result.x_adv - x).abs().max()) <= eps + 1e-6
    assert float(result.x_adv.min()) >= 0 and float(result.x_adv.max()) <= 1
    assert torch.equal(result.success, pred != y)  # the reused logits are the model's
    assert int((~result.success).sum()) <= int(clean.sum())
    assert int(result.success[clean].sum()) > 0  # it fools something at 4/255
    assert torch.equal(result.x_adv, again.x_adv)  # seeded: reproducible


def test_each_part_of_the_ensemble_only_helps(tiny_cnn: nn.Module, tiny_batch) -> None:
    x, y = tiny_batch
    eps = 2 / 255
    ensemble = ~AutoAttack(eps=eps, **BUDGET)(tiny_cnn, x, y).success
    for part in (APGD(eps=eps, steps=20), APGDT(eps=eps, steps=20), FABT(eps=eps, steps=20)):
        assert int(ensemble.sum()) <= int((~part(tiny_cnn, x, y).success).sum()), part


def test_early_stop_changes_no_verdict(tiny_cnn: nn.Module, tiny_batch) -> None:
    x, y = tiny_batch
    stopped = APGD(eps=2 / 255, steps=20)(tiny_cnn, x, y)
    full = APGD(eps=2 / 255, steps=20, early_stop=False)(tiny_cnn, x, y)
    assert torch.equal(stopped.success, full.success)
    assert stopped.gradients <= full.gradients


def test_targets_and_options_are_checked() -> None:
    with pytest.raises(ValueError, match="untargeted"):
        AutoAttack(eps=0.1, targeted=True)
    with pytest.raises(ValueError, match="loss"):
        APGD(eps=0.1, loss="hinge")
    with pytest.raises(ValueError, match="own targets"):
        FABT(eps=0.1, targeted=True)
    for attack in (AutoAttack, FABT):  # at construction, not once the ensemble runs
        with pytest.raises(ValueError, match="steps and n_target_classes must be >= 1"):
            attack(eps=0.1, steps=0)


@pytest.mark.parametrize("eps", [0.5 / 255, 1 / 255, 2 / 255], ids=["0.5/255", "1/255", "2/255"])
def test_agrees_with_reference_image_by_image(one_thread, eps: float) -> None:
    # 64 images, a random CNN: enough robust images at every eps for agreement to mean something.
    from tests.unit.attacks.conftest import make_tiny_cnn

    model = make_tiny_cnn()
    x = random_images(64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    ours = ~AutoAttack(eps=eps, **BUDGET)(model, x, y).success
    reference = reference_robust(model, x, y, eps)
    log.info("eps %.2f/255\n%s", eps * 255, agreement_table(ours, reference, y == y))
    assert 0 < int(reference.sum()) < 64
    assert int((ours != reference).sum()) <= 1


@pytest.mark.slow
@pytest.mark.parametrize("eps", [0.25 / 255, 2 / 255, 4 / 255], ids=["0.25/255", "2/255", "4/255"])
def test_lite0_robust_accuracy_within_one_image_of_reference(
    lite0: nn.Module, imagenet_photos, lite0_clean_correct: Tensor, eps: float
) -> None:
    x, y = imagenet_photos
    # Small budgets: the reference takes every step on every image, each a Lite0 forward and
    # backward pass on 20 photos at 224 px.
    budget = {"steps": 5, "n_target_classes": 3, "square_queries": 50}
    result = AutoAttack(eps=eps, **budget)(lite0, x, y)
    ours = ~result.success
    reference = reference_robust(lite0, x, y, eps, budget)
    log.info(
        "Lite0, eps %.2f/255, %.1f s\n%s",
        eps * 255,
        result.seconds,
        agreement_table(ours, reference, lite0_clean_correct),
    )
    assert abs(int(ours.sum()) - int(reference.sum())) <= 1
    assert int(ours.sum()) < int(lite0_clean_correct.sum())
