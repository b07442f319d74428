"""A random-weight Lite0 and tiny 32 px images: the trainers' behaviour, at CPU-test cost."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def random_lite0():
    from transferlab.backbones import load_backbone

    torch.manual_seed(0)
    return load_backbone("efficientnet_lite0", "none")


@pytest.fixture(scope="module")
def tiny_images():
    """12 train + 6 val images (3, 32, 32) in [0, 1], 3 classes told apart by colour."""
    g = torch.Generator().manual_seed(0)

    def make(n: int):
        y = torch.arange(n) % 3
        x = torch.rand(n, 3, 32, 32, generator=g) * 0.3
        x[torch.arange(n), y] += 0.6
        return x.clamp(0, 1), y

    return (*make(12), *make(6))
