"""The one contract every adaptation method meets, and how it is stored."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from torch import Tensor, nn

from transferlab import tensor_files
from transferlab.atomic import atomic_write
from transferlab.backbones import Backbone, load_backbone
from transferlab.data import file_sha256


class Classifier(nn.Module):
    """Backbone + head. Normalisation lives inside, so attacks work in [0, 1] pixel space.

    Attributes:
        backbone: the ImageNet feature extractor (frozen or fine-tuned).
        head: features (N, D) -> logits (N, C).
        classes: class names, index = logit position.
        method: its name in the method registry (``transferlab.methods.METHODS``).
        input_size: the side, in px, the network sees. Every classifier takes the images the
            backbone's preprocessing makes (``backbone.spec``: resize, centre crop) and resizes
            them here to the size it was trained at, so each model is evaluated everywhere
            (ladder, attacks, transfer matrix) exactly as it was trained and is served, and all
            of them take the same inputs (eps means the same pixels for each).
    """

    def __init__(
        self,
        backbone: Backbone,
        head: nn.Module,
        classes: list[str],
        method: str,
        input_size: int | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.classes = list(classes)
        self.method = method
        self.input_size = input_size or backbone.spec.input_size

    def train(self, mode: bool = True) -> Classifier:
        """Only a fully fine-tuned backbone may leave eval mode: the others keep BatchNorm's
        ImageNet statistics."""
        from transferlab.methods import METHODS

        super().train(mode)
        method = METHODS.get(self.method)
        if method is None or not method.trains_backbone:
            self.backbone.eval()
        return self

    def forward(self, x01: Tensor) -> Tensor:
        """(N, 3, H, W) images in [0, 1] -> (N, C) logits (resized to ``input_size`` first)."""
        from transferlab.classifiers.training import resize_to

        return self.head(self.backbone.features(resize_to(x01, self.input_size)))


def _trains_backbone(method: str) -> bool:
    from transferlab.methods import METHODS

    return method in METHODS and METHODS[method].trains_backbone


def save_classifier(clf: Classifier, folder: Path, *, pretrained: str, extra: dict | None = None):
    """Write ``meta.json`` and ``head.pt``; for a method that trains its backbone also
    ``backbone.pt`` (its weights).

    Methods that keep the backbone frozen store only the head: the backbone is rebuilt from its
    registry name and checked against its weights digest. Files are renamed into place, so
    readers never see half a model (``meta.json`` last).
    """
    from transferlab.classifiers.training import head_spec

    folder.mkdir(parents=True, exist_ok=True)
    head = clf.head
    meta = {
        "method": clf.method,
        "classes": clf.classes,
        "backbone": clf.backbone.name,
        "pretrained": pretrained,
        "weights_digest": clf.backbone.weights_digest,
        "input_size": clf.input_size,
        "head": head_spec(head),
        "backbone_weights": _trains_backbone(clf.method),
        **(extra or {}),
    }
    files = {"head.pt": head.state_dict()}
    if meta["backbone_weights"]:
        files["backbone.pt"] = clf.backbone.state_dict()
    for name, state in files.items():
        tensor_files.save(state, folder / name)
    # meta.json last, with the digest of each weights file: a kill between the renames leaves
    # new weights beside an old meta.json, which load_classifier then refuses instead of mixing.
    meta["files"] = {name: file_sha256(folder / name) for name in files}
    meta["meta_digest"] = _meta_digest(meta)
    with atomic_write(folder / "meta.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)


def _meta_digest(meta: dict) -> str:
    """sha256 of everything else in ``meta.json``: an edit (two class names swapped, a bit
    flipped) would otherwise relabel every prediction without any error."""
    rest = {k: v for k, v in meta.items() if k != "meta_digest"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def read_meta(folder: Path) -> dict:
    """A stored model's ``meta.json``, checked against its own digest.

    Raises:
        FileNotFoundError: no ``meta.json``.
        ValueError: not JSON, or edited since it was written (both name the file).
    """
    path = folder / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError(f"expected an object, found {type(meta).__name__}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{path} is corrupt ({str(exc)[:120]}); re-run the stage that writes {folder}"
        ) from None
    # models written before the digest existed have none: they still load
    if "meta_digest" in meta and meta["meta_digest"] != _meta_digest(meta):
        raise ValueError(
            f"{path} was changed after it was written (its digest does not match: class names, "
            f"backbone or files edited); re-run the stage that writes {folder}"
        )
    return meta


def load_classifier(folder: Path) -> Classifier:
    """Rebuild a stored classifier in eval mode."""
    from transferlab.classifiers.training import head_from_spec

    meta = read_meta(folder)
    for name, digest in meta.get("files", {}).items():
        if not (folder / name).is_file() or file_sha256(folder / name) != digest:
            raise RuntimeError(
                f"{folder / name} does not match {folder / 'meta.json'} (a save was "
                f"interrupted); re-run the stage that writes {folder}"
            )
    backbone = load_backbone(meta["backbone"], meta["pretrained"])
    if backbone.weights_digest != meta["weights_digest"]:
        raise RuntimeError(
            f"{folder}: the backbone weights changed since this model was trained; re-run the stage"
        )
    if meta.get("backbone_weights"):
        backbone.load_state_dict(tensor_files.load(folder / "backbone.pt"))
    head = head_from_spec(meta["head"])
    head.load_state_dict(tensor_files.load(folder / "head.pt"))
    return Classifier(
        backbone, head, meta["classes"], meta["method"], meta.get("input_size")
    ).eval()
