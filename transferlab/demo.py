"""The seed's demo: what the public ImageNet model sees before and after FGSM on one photo."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from transferlab.eps import Eps

log = logging.getLogger(__name__)


def fgsm_demo(
    image: Path,
    *,
    eps: float,
    out: Path,
    backbone: str = "efficientnet_lite0",
    pretrained: str = "package",
    target: int | None = None,
    top: int = 3,
) -> dict:
    """FGSM on one image against the ImageNet model (backbone + its ImageNet head).

    Untargeted, the attack moves away from the model's own clean top-1 class (no label needed);
    with ``target`` it descends towards that ImageNet class index.

    Args:
        image: any image file Pillow reads; resized and centre-cropped like the backbone's data.
        eps: L-inf budget in pixel space ([0, 1] images), e.g. 2/255.
        out: PNG to write: clean | amplified perturbation | adversarial, captioned.
        top: how many classes to list before and after.

    Returns:
        ``before`` / ``after``: top classes as (name, probability); ``changed``: whether top-1
        changed; ``linf``: the perturbation's L-inf norm; ``png``: the written picture.
    """
    from transferlab.attacks import FGSM
    from transferlab.backbones import load_backbone
    from transferlab.features import load_images
    from transferlab.report import plot_adversarial_grid
    from transferlab.robustness import imagenet_class_names

    model = load_backbone(backbone, pretrained)
    names = imagenet_class_names()
    x = load_images([Path(image)], model.spec)
    with torch.inference_mode():
        clean_pred = model(x).argmax(1)
    goal = clean_pred if target is None else torch.tensor([target])
    result = FGSM(eps=eps, targeted=target is not None)(model, x, goal)
    with torch.inference_mode():
        p_clean, p_adv = model(x).softmax(1)[0], model(result.x_adv).softmax(1)[0]

    def ranked(p: torch.Tensor) -> list[tuple[str, float]]:
        values, idx = p.topk(top)
        return [(names[int(i)], float(v)) for v, i in zip(values, idx, strict=True)]

    before, after = ranked(p_clean), ranked(p_adv)
    plot_adversarial_grid(
        [
            {
                "x": x[0],
                "x_adv": result.x_adv[0],
                "title": f"FGSM eps={Eps(eps).label}",
                "clean": f"{before[0][0][:28]} ({before[0][1]:.0%})",
                "adv": f"{after[0][0][:28]} ({after[0][1]:.0%})",
            }
        ],
        Path(out),
    )
    return {
        "image": str(image),
        "eps": eps,
        "targeted": None if target is None else names[target],
        "before": before,
        "after": after,
        "changed": int(p_clean.argmax()) != int(p_adv.argmax()),
        "linf": float((result.x_adv - x).abs().max()),
        "png": str(out),
    }
