"""Batched feature extraction with a content-addressed, append-only cache.

The cache key of one feature vector is (key space, image sha256), where the key space digests the
backbone name, its weights, the preprocessing signature, the layer and the dtype. A change to any
of those lands in a fresh key space, so stale features are never served. Each extraction appends
one shard (``.npz``: ``sha256`` + ``features``), written to a temp file and renamed, so a kill
mid-write leaves no corrupt shard and two processes filling one cache never clash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from transferlab.atomic import atomic_write
from transferlab.backbones import Backbone, BackboneSpec, preprocess_transform
from transferlab.data import open_rgb

log = logging.getLogger(__name__)

LAYER = "pooled"


def atomic_save_npz(dest: Path, /, **arrays: np.ndarray) -> None:
    """Write an ``.npz`` next to ``dest`` and rename it into place."""
    with atomic_write(dest) as f:
        np.savez(f, **arrays)


def key_space(backbone: Backbone, *, background: tuple[int, int, int], precision: str) -> str:
    """Digest of everything besides the image that determines a feature vector."""
    blob = json.dumps(
        {
            "backbone": backbone.name,
            "weights": backbone.weights_digest,
            "preprocessing": backbone.spec.preprocessing_signature,
            "background": list(background),
            "layer": LAYER,
            "dtype": precision,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass
class FeatureCache:
    """Features by image sha256 inside one key space of a cache folder."""

    root: Path
    space: str
    hits: int = 0
    misses: int = 0
    _index: dict[str, tuple[Path, int]] = field(default_factory=dict, repr=False)

    @property
    def folder(self) -> Path:
        return self.root / self.space

    def refresh(self) -> None:
        """Rebuild the in-memory index from the shards on disk."""
        self._index.clear()
        for shard in sorted(self.folder.glob("shard-*.npz")):
            with np.load(shard) as z:
                for row, sha in enumerate(z["sha256"].tolist()):
                    self._index.setdefault(sha, (shard, row))

    def __contains__(self, sha: str) -> bool:
        return sha in self._index

    def get(self, shas: Sequence[str]) -> np.ndarray:
        """Stack cached features for ``shas`` (all must be present), in order."""
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for i, sha in enumerate(shas):
            shard, row = self._index[sha]
            by_shard.setdefault(shard, []).append((i, row))
        out: np.ndarray | None = None
        for shard, pairs in by_shard.items():
            with np.load(shard) as z:
                feats = z["features"]
            if out is None:
                out = np.empty((len(shas), feats.shape[1]), dtype=np.float32)
            idx, rows = zip(*pairs, strict=True)
            out[list(idx)] = feats[list(rows)]
        return out if out is not None else np.empty((0, 0), dtype=np.float32)

    def put(self, shas: Sequence[str], features: np.ndarray) -> Path:
        """Append one shard; its name is a digest of its content (idempotent)."""
        shas_arr = np.asarray(shas)
        digest = hashlib.sha256("".join(shas).encode() + features.tobytes()).hexdigest()[:16]
        shard = self.folder / f"shard-{digest}.npz"
        atomic_save_npz(shard, sha256=shas_arr, features=features.astype(np.float32))
        for row, sha in enumerate(shas):
            self._index.setdefault(sha, (shard, row))
        return shard


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[Path], spec: BackboneSpec, background):
        self.paths = list(paths)
        self.transform = preprocess_transform(spec)
        self.background = tuple(background)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(open_rgb(self.paths[i], background=self.background))


def load_images(
    paths: Sequence[Path], spec: BackboneSpec, *, background=(255, 255, 255)
) -> torch.Tensor:
    """Decode and preprocess images into one (N, 3, S, S) tensor in [0, 1]."""
    ds = _ImageFiles(paths, spec, background)
    return torch.stack([ds[i] for i in range(len(ds))]) if len(ds) else torch.empty(0, 3, 1, 1)


def _extract(
    backbone: Backbone,
    paths: Sequence[Path],
    *,
    batch_size: int,
    num_workers: int,
    precision: str,
    background,
) -> np.ndarray:
    loader = DataLoader(
        _ImageFiles(paths, backbone.spec, background),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    device = next(backbone.parameters()).device
    model = backbone.to(memory_format=torch.channels_last).eval()
    chunks: list[np.ndarray] = []
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"),
        tqdm(total=len(paths), unit="img", desc=f"features {backbone.name}") as bar,
    ):
        for x in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            chunks.append(model.features(x).float().cpu().numpy())
            bar.update(len(x))
    return np.concatenate(chunks) if chunks else np.empty((0, backbone.feature_dim), np.float32)


@dataclass(frozen=True)
class ExtractStats:
    images: int
    hits: int
    misses: int
    seconds: float

    @property
    def hit_rate(self) -> float:
        return self.hits / self.images if self.images else 1.0


def extract_features(
    backbone: Backbone,
    paths: Sequence[Path],
    shas: Sequence[str],
    *,
    cache_root: Path,
    batch_size: int = 16,
    num_workers: int = 0,
    precision: str = "fp32",
    background=(255, 255, 255),
) -> tuple[np.ndarray, ExtractStats]:
    """Features for every image, computing only those the cache has not seen.

    Args:
        paths: image files, aligned with ``shas`` (their content digests).

    Returns:
        (N, D) float32 features in input order, and hit/miss counts.
    """
    start = time.perf_counter()
    cache = FeatureCache(
        Path(cache_root), key_space(backbone, background=background, precision=precision)
    )
    cache.refresh()
    todo = [i for i, sha in enumerate(shas) if sha not in cache]
    unique_todo = list({shas[i]: i for i in todo}.values())
    if unique_todo:
        log.info("extracting %d new images (%d cached)", len(unique_todo), len(shas) - len(todo))
        feats = _extract(
            backbone,
            [paths[i] for i in unique_todo],
            batch_size=batch_size,
            num_workers=num_workers,
            precision=precision,
            background=background,
        )
        cache.put([shas[i] for i in unique_todo], feats)
    stats = ExtractStats(
        images=len(shas),
        hits=len(shas) - len(todo),
        misses=len(todo),
        seconds=time.perf_counter() - start,
    )
    return cache.get(shas), stats
