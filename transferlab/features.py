"""Batched feature extraction through the content-addressed cache (``transferlab.cache``).

The cache key of one feature vector is (key space, image sha256), where the key space digests the
backbone name, its weights, the preprocessing signature, the layer and the dtype. A change to any
of those lands in a fresh key space, so stale features are never served. Only images the cache
has not seen are decoded (in DataLoader workers) and run through the backbone (channels_last,
inference mode, optionally bf16/fp16 autocast and ``torch.compile``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from transferlab.atomic import atomic_write, write_json
from transferlab.backbones import (
    Backbone,
    BackboneSpec,
    preprocess_transform,
    resize_crop_transform,
    to_unit_float,
)
from transferlab.cache import EntriesLost, FeatureCache, record_run
from transferlab.data import open_rgb
from transferlab.layout import PARTS, split_rows
from transferlab.precision import (
    BF16_ISA,
    bf16_native,
    choose,
    cpu_flags,
    prediction_agreement,
    probe_sample,
)
from transferlab.progress import progress

__all__ = [
    "ExtractStats",
    "FeatureCache",
    "atomic_save_npz",
    "bf16_native",
    "extract_features",
    "key_space",
    "load_images",
    "resolve_batch_size",
    "resolve_precision",
]

log = logging.getLogger(__name__)

LAYER = "pooled"
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# torch.compile costs tens of seconds on a CPU; below this many new images it cannot pay off
COMPILE_MIN_IMAGES = 512


def atomic_save_npz(dest: Path, /, **arrays: np.ndarray) -> None:
    """Write an ``.npz`` next to ``dest`` and rename it into place."""
    with atomic_write(dest) as f:
        np.savez(f, **arrays)


def _space_meta(backbone: Backbone, background: tuple[int, int, int], precision: str) -> dict:
    return {
        "backbone": backbone.name,
        "weights": backbone.weights_digest,
        "preprocessing": backbone.spec.preprocessing_signature,
        "background": list(background),
        "layer": LAYER,
        "dtype": precision,
    }


def key_space(backbone: Backbone, *, background: tuple[int, int, int], precision: str) -> str:
    """Digest of everything besides the image that determines a feature vector."""
    blob = json.dumps(_space_meta(backbone, tuple(background), precision), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# ------------------------------------------------------------------ hardware choices


def _device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    # the verdict depends on the instruction set and on how many threads share the work
    isa = "+".join(sorted(BF16_ISA & cpu_flags())) or "none"
    return f"cpu:{platform.machine()}:{isa}:threads={torch.get_num_threads()}"


def cosine_agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean, min) row-wise cosine similarity of two (N, D) feature matrices."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    cos = (a * b).sum(axis=1)
    return float(cos.mean()), float(cos.min())


def _timed_features(model: Backbone, x: torch.Tensor, precision: str, batch_size: int):
    """(seconds, (N, D) features) for ``x`` in batches, after one warm-up batch."""
    dtype = AUTOCAST[precision]
    with (
        torch.inference_mode(),
        torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None),
    ):
        model.features(x[:batch_size])  # warm-up: kernels, allocator
        start = time.perf_counter()
        out = [model.features(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)]
        if x.device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cat(out).cpu().numpy()


def probe_bf16(
    backbone: Backbone, x: torch.Tensor, labels: Sequence[str], *, batch_size: int = 16
) -> dict:
    """Time fp32 against bf16 autocast on real images and compare what they lead to.

    Args:
        x: (N, 3, S, S) images in [0, 1], already on the backbone's device.
        labels: (N,) their classes.

    Returns:
        ``{"speedup", "svm", "top", "n_test", "mean_cos", "min_cos", "choice"}``: the svm/top
        prediction agreement of ``transferlab.precision.prediction_agreement``; choice by
        ``transferlab.precision.choose`` (faster, and >= 99.5% of predictions unchanged).
    """
    model = backbone.to(memory_format=torch.channels_last).eval()
    x = x.contiguous(memory_format=torch.channels_last)
    t32, f32 = _timed_features(model, x, "fp32", batch_size)
    t16, f16 = _timed_features(model, x, "bf16", batch_size)
    mean_cos, min_cos = cosine_agreement(f32, f16)
    speedup = t32 / t16
    agreement = prediction_agreement(f32, f16, labels)
    return {
        "speedup": round(speedup, 3),
        **agreement,
        "mean_cos": mean_cos,
        "min_cos": min_cos,
        "choice": choose(speedup, agreement),
    }


def resolve_precision(
    requested: str,
    backbone: Backbone,
    sample: Sequence[Path],
    *,
    labels: Sequence[str] | None = None,
    cache_root: Path,
    background=(255, 255, 255),
    batch_size: int = 16,
) -> str:
    """Turn ``auto`` into ``fp32`` or ``bf16``; other values pass through.

    ``auto`` is ``fp32`` unless the device computes bf16 natively; then a probe on a stratified
    sample of the real images (``sample``, with their ``labels``) decides
    (``transferlab.precision``: faster, and the svm/top predictions unchanged), and its verdict
    is stored in the cache folder (``precision.json``, per backbone, weights, device, torch
    version and sample) so it runs once. Without labels there is nothing to judge by: ``fp32``.
    """
    if requested != "auto":
        return requested
    device = next(backbone.parameters()).device
    if not bf16_native(device) or not labels or len(set(labels)) < 2:
        return "fp32"
    chosen = probe_sample(labels)
    files = [Path(sample[i]) for i in chosen]
    names = [labels[i] for i in chosen]
    digest = hashlib.sha256(
        "|".join(f"{f.name}:{n}" for f, n in zip(files, names, strict=True)).encode()
    )
    key = (
        f"{backbone.name}|{backbone.weights_digest}|{_device_tag(device)}|{torch.__version__}"
        f"|{digest.hexdigest()[:16]}"
    )
    store = Path(cache_root) / "precision.json"
    try:
        known = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]["choice"]
    x = load_images(files, backbone.spec, background=background).to(device)
    verdict = probe_bf16(backbone, x, names, batch_size=batch_size)
    log.info(
        "precision auto: %s (bf16 %.2fx; svm/top predictions agree %.1f%%/%.1f%% on %d images)",
        verdict["choice"],
        verdict["speedup"],
        100 * verdict["svm"],
        100 * verdict["top"],
        verdict["n_test"],
    )
    known[key] = verdict
    write_json(store, known)
    return verdict["choice"]


def resolve_batch_size(requested: int | str, backbone: Backbone) -> int:
    """``auto``: 16 on a CPU (it beat 64 here: cache-sized activations); on a GPU the largest
    power of two up to 256 whose forward pass fits in memory."""
    if requested != "auto":
        return int(requested)
    device = next(backbone.parameters()).device
    if device.type != "cuda":
        return 16
    size = backbone.spec.input_size
    for bs in (256, 128, 64, 32, 16):
        try:
            with torch.inference_mode():
                backbone.features(torch.zeros(bs, 3, size, size, device=device))
            return bs
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
    return 8


# ------------------------------------------------------------------ decoding


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[Path], transform, background):
        self.paths = list(paths)
        self.transform = transform
        self.background = tuple(background)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        # Grayscale files are resized as one channel, then copied to three: the same pixels as
        # resizing their RGB conversion (Pillow resamples each channel alike), for a third of
        # the work on MNIST-like data.
        im = open_rgb(self.paths[i], background=self.background, keep_gray=True)
        x = self.transform(im)
        return x.expand(3, -1, -1) if x.shape[0] == 1 else x


def load_images(
    paths: Sequence[Path], spec: BackboneSpec, *, background=(255, 255, 255)
) -> torch.Tensor:
    """Decode and preprocess images into one (N, 3, S, S) tensor in [0, 1]."""
    ds = _ImageFiles(paths, preprocess_transform(spec), background)
    return torch.stack([ds[i] for i in range(len(ds))]) if len(ds) else torch.empty(0, 3, 1, 1)


def _extract(
    backbone: Backbone,
    paths: Sequence[Path],
    *,
    batch_size: int,
    num_workers: int,
    precision: str,
    background,
    compile: bool = False,
) -> np.ndarray:
    device = next(backbone.parameters()).device
    on_gpu = device.type == "cuda"
    loader = DataLoader(
        _ImageFiles(paths, resize_crop_transform(backbone.spec), background),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=on_gpu,  # page-locked host batches, so the copy below overlaps compute
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )
    model = backbone.to(memory_format=torch.channels_last).eval()
    run = model.features
    if compile and len(paths) >= COMPILE_MIN_IMAGES:
        run = torch.compile(model.features, dynamic=False)
    elif compile:
        log.info("torch.compile skipped: %d images cannot pay for compiling", len(paths))
    dtype = AUTOCAST[precision]
    chunks: list[np.ndarray] = []
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None),
        progress(total=len(paths), unit="img", desc=f"features {backbone.name} {precision}") as bar,
    ):
        for x in loader:
            x = x.to(device, non_blocking=on_gpu).contiguous(memory_format=torch.channels_last)
            x = to_unit_float(x)  # keeps channels_last
            chunks.append(run(x).float().cpu().numpy())
            bar.update(len(x))
    return np.concatenate(chunks) if chunks else np.empty((0, backbone.feature_dim), np.float32)


@dataclass(frozen=True)
class ExtractStats:
    images: int
    hits: int
    misses: int
    seconds: float
    precision: str = "fp32"
    batch_size: int = 16
    space: str = ""

    @property
    def hit_rate(self) -> float:
        return self.hits / self.images if self.images else 1.0


def extract_features(
    backbone: Backbone,
    paths: Sequence[Path],
    shas: Sequence[str],
    *,
    cache_root: Path,
    batch_size: int | str = 16,
    num_workers: int = 0,
    precision: str = "fp32",
    background=(255, 255, 255),
    compile: bool = False,
    record: bool = True,
    checkpoint_every: int | None = None,
    labels: Sequence[str] | None = None,
) -> tuple[np.ndarray, ExtractStats]:
    """Features for every image, computing only those the cache has not seen.

    Args:
        paths: image files, aligned with ``shas`` (their content digests).
        precision: ``fp32 | bf16 | fp16`` autocast, or ``auto`` (see ``resolve_precision``,
            which judges bf16 by the predictions it leads to on ``labels``, aligned with
            ``paths``).
        batch_size: an int, or ``auto`` (see ``resolve_batch_size``).
        record: write this run's hit/miss counts to ``<cache_root>/last_run.json``.
        checkpoint_every: write a cache shard after each this many new images, so a killed
            run resumes from the last one; ``None``: one shard at the end. Ignored with
            ``compile`` (each chunk would compile again).

    Returns:
        (N, D) float32 features in input order, and hit/miss counts.
    """
    start = time.perf_counter()
    cache_root = Path(cache_root)
    background = tuple(background)
    bs = resolve_batch_size(batch_size, backbone)
    precision = resolve_precision(
        precision,
        backbone,
        paths,
        labels=labels,
        cache_root=cache_root,
        background=background,
        batch_size=bs,
    )
    space = key_space(backbone, background=background, precision=precision)
    cache = FeatureCache(cache_root, space)
    cache.refresh()
    hits = None
    # a shard that fails its digest check while being served is quarantined and its images
    # extracted again; a second failure in a row is a disk that keeps corrupting what it holds
    for attempt in range(3):
        todo = [i for i, sha in enumerate(shas) if sha not in cache]
        hits = len(shas) - len(todo) if hits is None else hits
        unique_todo = list({shas[i]: i for i in todo}.values())
        if unique_todo:
            log.info(
                "extracting %d new images (%d cached)", len(unique_todo), len(shas) - len(todo)
            )
            cache.describe(_space_meta(backbone, background, precision))
            chunk = len(unique_todo) if compile or not checkpoint_every else checkpoint_every
            for at in range(0, len(unique_todo), chunk):
                part = unique_todo[at : at + chunk]
                feats = _extract(
                    backbone,
                    [paths[i] for i in part],
                    batch_size=bs,
                    num_workers=num_workers,
                    precision=precision,
                    background=background,
                    compile=compile,
                )
                cache.put([shas[i] for i in part], feats)
        try:
            features = cache.get(shas)
            break
        except EntriesLost as exc:
            if attempt == 2:
                raise RuntimeError(
                    f"the feature cache {cache.folder} keeps failing verification ({exc}); "
                    "check the disk, or point features.cache_dir elsewhere"
                ) from None
            log.warning("%s; extracting their images again", exc)
            hits -= sum(1 for sha in shas if sha not in cache)
    stats = ExtractStats(
        images=len(shas),
        hits=hits,
        misses=len(shas) - hits,
        seconds=time.perf_counter() - start,
        precision=precision,
        batch_size=bs,
        space=space,
    )
    if record:
        record_run(
            cache_root,
            {
                "images": stats.images,
                "hits": stats.hits,
                "misses": stats.misses,
                "hit_rate": stats.hit_rate,
                "seconds": round(stats.seconds, 3),
                "backbone": backbone.name,
                "precision": precision,
                "space": space,
            },
        )
    return features, stats


def split_images(
    root: Path,
    classes: list[str],
    spec: BackboneSpec,
    *,
    background: tuple[int, int, int],
    parts: tuple[str, ...] = PARTS,
    limit: int | None = None,
) -> dict[str, torch.Tensor]:
    """Decoded images (``x_<part>``: (N, 3, S, S) in [0, 1] at ``spec``'s size) and labels
    (``y_<part>``: (N,) int64) per split; ``limit`` keeps the first images of each part."""
    rows = split_rows(root)
    chosen = {p: [r for r in rows if r["split"] == p][:limit] for p in parts}
    out: dict[str, torch.Tensor] = {}
    # decoding hundreds of photos takes seconds: in chunks, so a bar can count them
    chunk = 32
    with progress(desc="decoding images", unit="img", total=sum(map(len, chosen.values()))) as bar:
        for part, part_rows in chosen.items():
            paths = [root / "data" / r["path"] for r in part_rows]
            pieces = []
            for i in range(0, len(paths), chunk):
                pieces.append(load_images(paths[i : i + chunk], spec, background=background))
                bar.update(len(pieces[-1]))
            s = spec.input_size
            out[f"x_{part}"] = torch.cat(pieces) if pieces else torch.empty(0, 3, s, s)
            out[f"y_{part}"] = torch.tensor(
                [classes.index(r["label"]) for r in part_rows], dtype=torch.long
            )
    return out
