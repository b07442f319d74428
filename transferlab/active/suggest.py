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
import hashlib
import json
import logging
import os
import stat
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
# as the feature cache's shard check (git's "racily clean" files): a file modified this recently
# may change again within one mtime tick, so its stat is not trusted later
RACY_NS = 2_000_000_000


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
        # resolved once here: every path under it is then absolute, with no resolve per file
        return _walk_images(source.resolve(), IMAGE_EXTENSIONS)
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
    base = source.parent.resolve()
    return [Path(os.path.normpath(base / p)) for p in items]


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
    """Pull's acceptance rules for each file, remembered as pull remembers them
    (``.transferlab/label/checked.json``): a file whose size and mtime are unchanged since it was
    last read is not read again (its sha256 is known), and bytes already judged under the same
    rules are not decoded again. A second suggest on the same pool reads no image.

    Returns:
        The usable images (byte-identical copies kept once) and ``{"path", "reason"}`` for the
        rest.
    """
    from transferlab.progress import progress

    dp = params.data
    rules = f"{dp.min_size},{dp.max_pixels},{dp.max_bytes},{list(dp.background)}"
    memo_path = root / CHECKS
    memo: dict = {}
    if memo_path.exists():
        try:
            memo = json.loads(memo_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            memo = {}  # a damaged memo only costs reading and decoding again
    verdicts = memo.get(rules, {})
    # path -> [size, mtime_ns, sha256] when last read; a file changed within RACY_NS of its
    # reading may change again within the same mtime tick, so it is not remembered
    known_files = memo.get("files", {})
    files: dict[str, list] = {}
    now = time.time_ns()
    ok: list[Candidate] = []
    rejected: list[dict] = []
    seen: dict[str, Path] = {}
    with progress(desc="checking unlabelled images", unit="img", total=len(paths)) as bar:
        for path in paths:
            bar.update()
            key = str(path)
            try:
                st = os.stat(path)
                if not stat.S_ISREG(st.st_mode):
                    rejected.append({"path": key, "reason": "not a regular file"})
                    continue
                if st.st_size > dp.max_bytes:  # judged before reading, as pull does
                    rejected.append(
                        {
                            "path": key,
                            "reason": f"too large: {st.st_size} bytes > data.max_bytes "
                            f"{dp.max_bytes}",
                        }
                    )
                    continue
                stamp = [st.st_size, st.st_mtime_ns]
                known = known_files.get(key)
                if known is not None and known[:2] == stamp and known[2] in verdicts:
                    sha = known[2]
                else:
                    data = path.read_bytes()  # once: hashed and, if new, decoded
                    sha = hashlib.sha256(data).hexdigest()
                    if sha not in verdicts:
                        verdicts[sha] = image_problem(data, dp) or ""
                if now - st.st_mtime_ns >= RACY_NS:
                    files[key] = [*stamp, sha]
            except OSError as exc:
                rejected.append({"path": key, "reason": f"unreadable: {exc.strerror or exc}"})
                continue
            if verdicts[sha]:
                rejected.append({"path": key, "reason": verdicts[sha]})
            elif sha in seen:
                rejected.append({"path": key, "reason": f"duplicate: same bytes as {seen[sha]}"})
            else:
                seen[sha] = path
                ok.append(Candidate(path, sha))
    memo[rules] = verdicts
    memo["files"] = {**known_files, **files}
    with atomic_write(memo_path, "w", encoding="utf-8") as f:
        json.dump(memo, f)
    return ok, rejected


def _labelled_shas(root: Path) -> set[str]:
    from transferlab.data import read_manifest
    from transferlab.layout import MANIFEST

    manifest = root / MANIFEST
    return {r["sha256"] for r in read_manifest(manifest)} if manifest.exists() else set()


def _train_features(root: Path) -> np.ndarray:
    """Features of the images the model was trained on (k-center measures distance to them):
    the train and val rows of the split that ``features/features.npz`` holds (after a ``label
    import`` and a pull, the split may already list images the features stage has not seen)."""
    from transferlab.layout import FEATURES, SPLIT, read_npz, split_rows

    if not (root / FEATURES).exists() or not (root / SPLIT).exists():
        return np.zeros((0, 0), dtype=np.float32)
    feats, paths = read_npz(root / FEATURES, "features", "path")
    seen = {r["path"] for r in split_rows(root) if r["split"] in ("train", "val")}
    keep = [i for i, p in enumerate(paths.tolist()) if p in seen]
    return feats[keep].astype(np.float32)


def load_scorer(root: Path, model: str):
    """The stored classifier ``models/<model>`` (its head scores the cached features); refuses
    models whose backbone was fine-tuned (their features are not the cached ones)."""
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
    return load_classifier(folder)


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
    scorer = load_scorer(root, model)
    classes = list(scorer.classes)
    t_model = time.perf_counter()
    paths = list_unlabelled(source)  # absolute
    t_listed = time.perf_counter()
    ok, rejected = check_candidates(paths, params, root)
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
    # the pipeline's own extraction: same precision and cache as the features stage, through
    # the scorer's backbone (loaded once; absolute paths stay themselves under root/data)
    rows = [{"path": str(c.path), "sha256": c.sha256} for c in pool]
    feats, stats = _extract_rows(params, root, rows, record=False, backbone=scorer.backbone)
    t_feats = time.perf_counter()
    with torch.no_grad():
        logits = scorer.head(torch.from_numpy(feats)).numpy()
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
                "path": str(c.path),
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
        # by phase: loading the model, listing the pool, pull's checks, reading (or extracting)
        # the features, scoring and selecting, writing thumbnails and the CSV
        "seconds_model": round(t_model - t0, 3),
        "seconds_list": round(t_listed - t_model, 3),
        "seconds_check": round(t_checked - t_listed, 3),
        "seconds_features": round(t_feats - t_checked, 3),
        "seconds_select": round(t_selected - t_feats, 3),
        "seconds_write": round(done - t_selected, 3),
        "seconds_total": round(done - t0, 3),
    }
