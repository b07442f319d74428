"""Attacks on real ImageNet EfficientNet-Lite0 and the 20 foolbox photos, against torchattacks.

Lite0 takes [0, 1] images and normalises inside, which is torchattacks' contract too, so both
libraries attack exactly the same function. All in fp32 on the CPU.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torchattacks
from torch import Tensor, nn

from transferlab.attacks import BIM, FGSM, PGD

log = logging.getLogger(__name__)

pytestmark = pytest.mark.slow


def correct(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).argmax(dim=1) == y


def test_lite0_is_a_real_imagenet_model(lite0_clean_correct: Tensor) -> None:
    # 17/20 top-1 with this preprocessing (see DESIGN.md); random weights would get 0.
    assert lite0_clean_correct.sum() >= 16


def test_fgsm_matches_torchattacks(lite0: nn.Module, imagenet_photos) -> None:
    x, y = imagenet_photos
    eps = 1 / 255
    ours = FGSM(eps=eps)(lite0, x, y)
    reference = torchattacks.FGSM(lite0, eps=eps)(x, y)
    diff = float((ours.x_adv - reference).abs().max())
    log.info("FGSM eps=1/255: max |ours - torchattacks| = %.3g", diff)
    assert diff <= 1e-6
    assert torch.equal(ours.success, ~correct(lite0, reference, y))


@pytest.mark.parametrize("early_stop", [False, True], ids=["all-steps", "early-stop"])
def test_pgd_robust_accuracy_matches_torchattacks(
    lite0: nn.Module, imagenet_photos, lite0_clean_correct: Tensor, early_stop: bool
) -> None:
    x, y = imagenet_photos
    # A small budget leaves accuracy between 0 and clean, so agreement means something.
    eps, steps, step_size = 0.25 / 255, 3, 0.125 / 255
    ours = BIM(eps=eps, steps=steps, step_size=step_size, early_stop=early_stop)(lite0, x, y)
    reference = torchattacks.PGD(lite0, eps=eps, alpha=step_size, steps=steps, random_start=False)
    ref_adv = reference(x, y)
    ours_acc = int((~ours.success).sum())
    ref_acc = int(correct(lite0, ref_adv, y).sum())
    log.info(
        "PGD eps=0.25/255 %d steps, early_stop=%s: robust %d/20 (ours) vs %d/20 (torchattacks), "
        "clean %d/20, max |diff| %.3g",
        steps,
        early_stop,
        ours_acc,
        ref_acc,
        int(lite0_clean_correct.sum()),
        float((ours.x_adv - ref_adv).abs().max()),
    )
    assert abs(ours_acc - ref_acc) <= 1
    assert ours_acc < int(lite0_clean_correct.sum())


@pytest.mark.parametrize("early_stop", [False, True], ids=["all-steps", "early-stop"])
def test_pgd_8_over_255_fools_lite0(lite0: nn.Module, imagenet_photos, early_stop: bool) -> None:
    x, y = imagenet_photos
    result = PGD(eps=8 / 255, steps=10, seed=0, early_stop=early_stop)(lite0, x, y)
    robust = int((~result.success).sum())
    log.info(
        "PGD eps=8/255 10 steps, early_stop=%s: robust %d/20, %d gradient batches, %.1f s",
        early_stop,
        robust,
        result.gradients,
        result.seconds,
    )
    assert robust <= 1
    assert (result.x_adv - x).abs().max() <= 8 / 255 + 1e-6
    # Early stopping ends once every image is fooled: an undefended model falls within a few.
    assert result.gradients < 10 if early_stop and robust == 0 else result.gradients == 10
    with torch.no_grad():
        assert torch.allclose(result.logits, lite0(result.x_adv), atol=1e-4)
