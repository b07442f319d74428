"""The bodies of the ``top`` and ``full`` stages (``transferlab.stages.top`` / ``.full``).

Both read ``features/features.npz`` or the images under ``data/`` per ``data/split.csv``, train,
and write ``models/<method>/`` and ``metrics/<method>.json`` (accuracies, per-class accuracy,
confusion matrix, per-epoch history, training time, trained parameter count).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from transferlab.config import Params

log = logging.getLogger(__name__)

PARTS = ("train", "val", "test")


def _images(params: Params, root: Path, classes: list[str], spec) -> dict[str, torch.Tensor]:
    """Images (N, 3, S, S) in [0, 1] and labels per split, at ``spec``'s input size."""
    from transferlab.features import load_images
    from transferlab.progress import progress
    from transferlab.stages import _split_rows

    rows = _split_rows(root)
    out: dict[str, torch.Tensor] = {}
    # decoding hundreds of photos takes seconds: in chunks, so a bar can count them
    chunk = 32
    total = sum(r["split"] in PARTS for r in rows)
    with progress(desc="decoding images", unit="img", total=total) as bar:
        for part in PARTS:
            paths = [root / "data" / r["path"] for r in rows if r["split"] == part]
            parts = []
            for i in range(0, len(paths), chunk):
                parts.append(
                    load_images(paths[i : i + chunk], spec, background=params.data.background)
                )
                bar.update(len(parts[-1]))
            out[f"x_{part}"] = (
                torch.cat(parts) if parts else torch.empty(0, 3, spec.input_size, spec.input_size)
            )
            out[f"y_{part}"] = torch.tensor(
                [classes.index(r["label"]) for r in rows if r["split"] == part], dtype=torch.long
            )
    return out


def run_top(params: Params, root: Path) -> dict:
    """Train the ``top`` head; write ``models/top`` and ``metrics/top.json``."""
    from transferlab.backbones import load_backbone
    from transferlab.classifiers import Classifier, save_classifier
    from transferlab.classifiers.top import train_top
    from transferlab.classifiers.training import predict, split_metrics, trained_parameters
    from transferlab.stages import TOP_METRICS, TOP_MODEL, _labelled_features, write_json

    tp = params.top
    data, classes, _ = _labelled_features(root)
    feats = {k: torch.from_numpy(v) for k, v in data.items()}
    backbone = load_backbone(params.features.backbone, params.features.pretrained)
    if tp.augment:
        imgs = _images(params, root, classes, backbone.spec)
        res = train_top(
            n_classes=len(classes),
            params=tp,
            x_train=imgs["x_train"],
            y_train=imgs["y_train"],
            x_val=imgs["x_val"],
            y_val=imgs["y_val"],
            backbone=backbone,
        )
    else:
        res = train_top(
            n_classes=len(classes),
            params=tp,
            x_train=feats["x_train"].float(),
            y_train=feats["y_train"],
            x_val=feats["x_val"].float(),
            y_val=feats["y_val"],
        )
    # the backbone is frozen, so its cached features are exactly what the classifier sees
    preds = {p: predict(res.head, feats[f"x_{p}"].float()) for p in PARTS}
    metrics = split_metrics(preds, {p: data[f"y_{p}"] for p in PARTS}, classes)
    metrics.update(
        {
            "history": res.history,
            "best_epoch": res.best_epoch,
            "epochs_run": len(res.history),
            "train_seconds": round(res.seconds, 4),
            "trained_parameters": trained_parameters([res.head]),
            "n_train": int(len(data["y_train"])),
            "trained_on": "images" if tp.augment else "cached_features",
        }
    )
    save_classifier(
        Classifier(backbone, res.head, classes, "top"),
        root / TOP_MODEL,
        pretrained=params.features.pretrained,
    )
    write_json(root / TOP_METRICS, metrics)
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | None)}


def _fingerprint(params: Params, root: Path) -> str:
    """Names the data and settings a checkpoint belongs to."""
    from transferlab.stages import MANIFEST, SPLIT

    h = hashlib.sha256(params.section_hash("full", "features", "data").encode())
    for rel in (MANIFEST, SPLIT):
        h.update((root / rel).read_bytes())
    return h.hexdigest()


def run_full(params: Params, root: Path) -> dict:
    """Fine-tune everything; write ``models/full`` and ``metrics/full.json``.

    A checkpoint under ``.transferlab/checkpoints/`` is written every epoch; a re-run after a
    kill continues from it (``full.resume``) and deletes it once the model is saved.
    """
    from transferlab.backbones import load_backbone
    from transferlab.classifiers import Classifier, save_classifier
    from transferlab.classifiers.full import train_full
    from transferlab.classifiers.training import predict, spec_at_size, split_metrics
    from transferlab.stages import (
        FULL_CHECKPOINT,
        FULL_METRICS,
        FULL_MODEL,
        _split_rows,
        write_json,
    )

    fp = params.full
    classes = sorted({r["label"] for r in _split_rows(root)})
    backbone = load_backbone(params.features.backbone, params.features.pretrained)
    backbone.spec = spec_at_size(backbone.spec, fp.image_size)
    imgs = _images(params, root, classes, backbone.spec)
    ckpt = root / FULL_CHECKPOINT
    res = train_full(
        backbone=backbone,
        n_classes=len(classes),
        params=fp,
        x_train=imgs["x_train"],
        y_train=imgs["y_train"],
        x_val=imgs["x_val"],
        y_val=imgs["y_val"],
        checkpoint=ckpt,
        fingerprint=_fingerprint(params, root),
    )
    clf = Classifier(res.backbone, res.head, classes, "full").eval().cpu()
    preds = {p: predict(clf, imgs[f"x_{p}"], batch_size=32, desc=f"full {p} set") for p in PARTS}
    metrics = split_metrics(preds, {p: imgs[f"y_{p}"].numpy() for p in PARTS}, classes)
    metrics.update(
        {
            "history": res.history,
            "best_epoch": res.best_epoch,
            "epochs_run": len(res.history),
            "resumed_from_epoch": res.resumed_from,
            "train_seconds": round(sum(h["seconds"] for h in res.history), 4),
            "trained_parameters": res.trained_parameters,
            "n_train": int(len(imgs["y_train"])),
            "image_size": backbone.spec.input_size,
            "bf16": res.bf16,
        }
    )
    save_classifier(clf, root / FULL_MODEL, pretrained=params.features.pretrained)
    write_json(root / FULL_METRICS, metrics)
    ckpt.unlink(missing_ok=True)
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | None) and k != "bf16"}
