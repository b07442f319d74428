"""``transferlab label suggest``: the images to label next.

The unlabelled images (a folder, or a CSV/JSON manifest of paths) pass pull's checks (bad files
are left out with a reason), go through the feature cache (only new images are extracted), are
scored by a trained model on the frozen backbone's features, and a query strategy picks the
``budget`` to label. The result is a CSV, written atomically: rank, path, thumbnail (a link
relative to the CSV), the model's guess, the strategy's score, the strategy, and an empty
``label`` column for the annotator to fill in and hand to ``transferlab label import``.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transferlab.atomic import atomic_write
from transferlab.config import Params

log = logging.getLogger(__name__)

CSV_COLUMNS = ("rank", "path", "thumbnail", "guess", "score", "strategy", "label")
CHECKS = ".transferlab/label/checked.json"


class LabelError(ValueError):
    """Unusable input for ``label suggest|import``; the message is one line saying what to do."""


@dataclass(frozen=True)
class Candidate:
    path: Path
    sha256: str


def list_unlabelled(source: Path) -> list[Path]:
    """Image files under a folder (recursively), or the ``path`` column of a CSV / the paths of
    a JSON list (strings or ``{"path": ...}`` objects), relative to the manifest's folder."""
    from transferlab.data.sources import IMAGE_EXTENSIONS, _walk_images

    if source.is_dir():
        return _walk_images(source, IMAGE_EXTENSIONS)
    if not source.is_file():
        raise LabelError(
            f"unlabelled images: {source} does not exist; put the images to choose from in that "
            f"folder or set label.unlabelled (a folder, .csv or .json)"
        )
    if source.suffix.lower() == ".csv":
        with open(source, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if "path" not in (reader.fieldnames or []):
                raise LabelError(f"{source}: no 'path' column; write a header line 'path'")
            items = [r["path"] for r in reader]
    elif source.suffix.lower() == ".json":
        data = json.loads(source.read_text(encoding="utf-8"))
        items = [d["path"] if isinstance(d, dict) else d for d in data]
    else:
        raise LabelError(f"{source}: expected a folder, a .csv or a .json list of image paths")
    return [(source.parent / p).resolve() for p in items]


def image_problem(data: bytes, dp) -> str | None:
    """Why pull would refuse these bytes under the ``data`` section ``dp``, or ``None``."""
    from transferlab.data import ImageRejected
    from transferlab.data.pull import check_image_bytes

    if len(data) > dp.max_bytes:
        return f"too large: {len(data)} bytes > data.max_bytes {dp.max_bytes}"
    try:
        check_image_bytes(
            data, min_size=dp.min_size, max_pixels=dp.max_pixels, background=tuple(dp.background)
        )
    except ImageRejected as exc:
        return exc.reason
    return None


def check_candidates(
    paths: list[Path], params: Params, root: Path
) -> tuple[list[Candidate], list[dict]]:
    """Pull's acceptance rules for each file; verdicts are remembered per content digest and
    rule set (``.transferlab/label/checked.json``), so a second suggest decodes nothing.

    Returns:
        The usable images (byte-identical copies kept once) and ``{"path", "reason"}`` for the
        rest.
    """
    from transferlab.data import file_sha256
    from transferlab.progress import progress

    dp = params.data
    rules = f"{dp.min_size},{dp.max_pixels},{dp.max_bytes},{list(dp.background)}"
    memo_path = root / CHECKS
    memo: dict = {}
    if memo_path.exists():
        try:
            memo = json.loads(memo_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            memo = {}  # a damaged memo only costs decoding again
    verdicts = memo.get(rules, {})
    ok: list[Candidate] = []
    rejected: list[dict] = []
    seen: dict[str, Path] = {}
    with progress(desc="checking unlabelled images", unit="img", total=len(paths)) as bar:
        for path in paths:
            bar.update()
            try:
                sha = file_sha256(path)
            except OSError as exc:
                rejected.append({"path": str(path), "reason": f"unreadable: {exc.strerror or exc}"})
                continue
            if sha not in verdicts:
                verdicts[sha] = image_problem(path.read_bytes(), dp) or ""
            if verdicts[sha]:
                rejected.append({"path": str(path), "reason": verdicts[sha]})
            elif sha in seen:
                rejected.append(
                    {"path": str(path), "reason": f"duplicate: same bytes as {seen[sha]}"}
                )
            else:
                seen[sha] = path
                ok.append(Candidate(path, sha))
    memo[rules] = verdicts
    with atomic_write(memo_path, "w", encoding="utf-8") as f:
        json.dump(memo, f)
    return ok, rejected


def _labelled_shas(root: Path) -> set[str]:
    from transferlab.data import read_manifest
    from transferlab.layout import MANIFEST

    manifest = root / MANIFEST
    return {r["sha256"] for r in read_manifest(manifest)} if manifest.exists() else set()


def _train_features(root: Path) -> np.ndarray:
    """Features of the images the model was trained on (k-center measures distance to them)."""
    from transferlab.layout import FEATURES, SPLIT, labelled_features

    if not (root / FEATURES).exists() or not (root / SPLIT).exists():
        return np.zeros((0, 0), dtype=np.float32)
    data, _ = labelled_features(root)
    return np.concatenate([data["x_train"], data["x_val"]]).astype(np.float32)


def load_scorer(root: Path, model: str):
    """The head of ``models/<model>`` and its classes; refuses models whose backbone was
    fine-tuned (their features are not the cached ones)."""
    from transferlab.classifiers import load_classifier

    folder = root / "models" / model
    if not (folder / "meta.json").exists():
        raise LabelError(
            f"no trained model at {folder}; run `transferlab {model}` (or dvc repro) first, or "
            f"set label.model to a trained one"
        )
    from transferlab.methods import METHODS

    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    if meta.get("backbone_weights") or (model in METHODS and METHODS[model].trains_backbone):
        raise LabelError(
            f"label.model {model!r} fine-tunes its backbone, so the cached features do not "
            f"describe what it sees; choose a model on the frozen backbone (e.g. svm or top)"
        )
    clf = load_classifier(folder)
    return clf.head, list(clf.classes)


def _thumbnail(src: Path, dest: Path, size: int, background: tuple[int, int, int]) -> None:
    from transferlab.data import open_rgb

    if dest.exists():  # named by content digest: an existing one is this image's
        return
    im = open_rgb(src, background=background)
    im.thumbnail((size, size))
    with atomic_write(dest) as f:
        im.save(f, format="JPEG", quality=85)


def suggest(
    params: Params,
    root: Path,
    *,
    budget: int | None = None,
    strategy: str | None = None,
    model: str | None = None,
    source: Path | None = None,
    out: Path | None = None,
) -> dict:
    """Write the CSV of the images to label next (see the module docstring).

    Args:
        params: the workspace's params (``label``, ``data``, ``features``).
        root: the workspace.
        budget, strategy, model, source, out: override ``label.*``.

    Returns:
        Counts, timings (feature extraction apart from the rest) and the CSV's path.
    """
    from transferlab.active.strategies import STRATEGIES, select, softmax
    from transferlab.stages import _extract_rows

    lp = params.label
    budget = budget or lp.budget
    strategy = strategy or lp.strategy
    model = model or lp.model
    source = root / (source or lp.unlabelled)
    out = root / (out or lp.out)
    if strategy not in STRATEGIES:
        raise LabelError(f"unknown strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    t0 = time.perf_counter()
    head, classes = load_scorer(root, model)
    ok, rejected = check_candidates(list_unlabelled(source), params, root)
    for r in rejected:
        log.warning("left out %s: %s", r["path"], r["reason"])
    known = _labelled_shas(root)
    pool = [c for c in ok if c.sha256 not in known]
    if len(ok) > len(pool):
        log.info("%d image(s) are already in data/ (labelled); left out", len(ok) - len(pool))
    if not pool:
        raise LabelError(
            f"no usable unlabelled image in {source} ({len(rejected)} rejected, "
            f"{len(ok) - len(pool)} already labelled); add images there"
        )
    t_checked = time.perf_counter()
    # the pipeline's own extraction: same backbone, precision and cache as the features stage
    # (absolute paths: joined onto root/data they stay themselves)
    rows = [{"path": str(c.path.resolve()), "sha256": c.sha256} for c in pool]
    feats, stats = _extract_rows(params, root, rows, record=False)
    t_feats = time.perf_counter()
    with torch.no_grad():
        logits = head(torch.from_numpy(feats)).numpy()
    probs = softmax(logits)
    sel = select(
        strategy,
        budget=budget,
        features=feats,
        labelled=_train_features(root),
        probs=probs,
        seed=lp.seed,
    )
    t_selected = time.perf_counter()
    thumbs = out.parent / "thumbs"
    table = []
    for rank, (i, score) in enumerate(zip(sel.indices, sel.scores, strict=True), start=1):
        c = pool[int(i)]
        thumb = thumbs / f"{c.sha256[:16]}.jpg"
        _thumbnail(c.path, thumb, lp.thumb_size, tuple(params.data.background))
        table.append(
            {
                "rank": rank,
                "path": str(c.path.resolve()),
                "thumbnail": thumb.relative_to(out.parent).as_posix(),
                "guess": classes[int(probs[i].argmax())],
                "score": f"{float(score):.6g}",
                "strategy": strategy,
                "label": "",
            }
        )
    with atomic_write(out, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
    done = time.perf_counter()
    log.info("wrote %s: %d image(s) to label (%s, scored by %s)", out, len(table), strategy, model)
    return {
        "csv": str(out),
        "suggested": len(table),
        "pool": len(pool),
        "rejected": len(rejected),
        "already_labelled": len(ok) - len(pool),
        "strategy": strategy,
        "model": model,
        "features_extracted": stats.misses,
        "features_cached": stats.hits,
        "seconds_check": round(t_checked - t0, 3),
        "seconds_features": round(t_feats - t_checked, 3),
        "seconds_select": round(t_selected - t_feats, 3),
        "seconds_total": round(done - t0, 3),
    }
