"""``transferlab label import FILE.csv``: merge returned labels into the data, all or nothing.

The CSV needs ``path`` and ``label`` columns (``label suggest`` writes both; the annotator fills
in ``label``; rows left blank are skipped). Every row is checked first: the class must exist
(or be named with ``new_classes``), no image may appear twice or already be in the data, every
file must exist and pass pull's image checks. One problem refuses the whole file, and the error
lists each problem with its row. Accepted images are copied to ``labelled/<class>/`` (named by
content digest); the ``pull`` stage merges that folder into ``data/``, so the next
``dvc repro`` / flow run makes a new data version and reruns only the stages downstream of it,
with features extracted only for the new images (the cache).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from transferlab.active.suggest import LabelError, image_problem
from transferlab.config import Params

log = logging.getLogger(__name__)

_SHOW = 10  # problems listed in the one-line error


def known_classes(root: Path) -> set[str]:
    """Classes of the current data (``data/manifest.csv``) and of earlier imports."""
    from transferlab.data import read_manifest
    from transferlab.layout import LABELLED_DIR, MANIFEST

    classes = set()
    if (root / MANIFEST).exists():
        classes |= {r["label"] for r in read_manifest(root / MANIFEST)}
    labelled = root / LABELLED_DIR
    if labelled.is_dir():
        classes |= {p.name for p in labelled.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return classes


def _present_shas(root: Path) -> dict[str, str]:
    """sha256 -> where it already is (the data's manifest, or labelled/)."""
    from transferlab.data import file_sha256, read_manifest
    from transferlab.layout import LABELLED_DIR, MANIFEST

    out = {}
    if (root / MANIFEST).exists():
        out = {r["sha256"]: f"data/{r['path']}" for r in read_manifest(root / MANIFEST)}
    for path in sorted((root / LABELLED_DIR).glob("*/*")):
        if path.is_file():
            out.setdefault(file_sha256(path), str(path.relative_to(root)))
    return out


def validate(
    params: Params, root: Path, csv_path: Path, *, new_classes: tuple[str, ...] = ()
) -> list[dict]:
    """Check every row; return the accepted ``{"path", "label", "sha256", "data"}`` or raise.

    Raises:
        LabelError: one line naming each problem (row number, what, what to do); nothing is
            written.
    """
    if not csv_path.is_file():
        raise LabelError(f"{csv_path} does not exist; pass the CSV that `label suggest` wrote")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing_cols = {"path", "label"} - set(reader.fieldnames or [])
        if missing_cols:
            raise LabelError(
                f"{csv_path}: no {' or '.join(sorted(missing_cols))} column; the header needs "
                f"'path,label' (as `label suggest` writes it)"
            )
        rows = list(reader)
    from transferlab.names import UnsafeName, data_name

    for name in new_classes:
        try:
            data_name(name)  # a class becomes a folder, a CSV cell and an MLflow key
        except UnsafeName as exc:
            raise LabelError(f"new class: {exc}; choose another name") from None
    classes = known_classes(root) | set(new_classes)
    present = _present_shas(root)
    dp = params.data
    problems: list[str] = []
    accepted: list[dict] = []
    by_path: dict[Path, int] = {}
    by_sha: dict[str, int] = {}
    blank = 0
    for n, row in enumerate(rows, start=2):  # row 1 is the header
        label = (row.get("label") or "").strip()
        if not label:
            blank += 1
            continue
        raw = (row.get("path") or "").strip()
        path = (csv_path.parent / raw).resolve() if raw else None
        if path is None:
            problems.append(f"row {n}: no path")
            continue
        if label not in classes:
            problems.append(
                f"row {n}: unknown class {label!r} (known: {', '.join(sorted(classes))}; "
                f"to add a class pass --new-class {label})"
            )
        if path in by_path:
            problems.append(f"row {n}: duplicate of row {by_path[path]} ({path.name})")
            continue
        by_path[path] = n
        if not path.is_file():
            problems.append(f"row {n}: missing file {path}")
            continue
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if sha in by_sha:
            problems.append(f"row {n}: duplicate of row {by_sha[sha]} (same image bytes)")
            continue
        by_sha[sha] = n
        if sha in present:
            problems.append(f"row {n}: {path.name} is already in the data as {present[sha]}")
            continue
        reason = image_problem(data, dp)
        if reason:
            problems.append(f"row {n}: {path.name} rejected: {reason}")
            continue
        accepted.append({"path": path, "label": label, "sha256": sha, "data": data})
    if problems:
        more = f" (and {len(problems) - _SHOW} more)" if len(problems) > _SHOW else ""
        raise LabelError(
            f"{csv_path}: refused, nothing merged: {len(problems)} problem(s): "
            + "; ".join(problems[:_SHOW])
            + more
            + "; fix the rows and import again"
        )
    if not accepted:
        raise LabelError(
            f"{csv_path}: no labelled row ({blank} with an empty label); fill in the label column"
        )
    return accepted


def import_labels(
    params: Params, root: Path, csv_path: Path, *, new_classes: tuple[str, ...] = ()
) -> dict:
    """Validate ``csv_path`` whole, then copy its images to ``labelled/<class>/``.

    The copies are staged in a temporary folder and renamed in; if any rename fails, the ones
    already moved are removed again, so ``labelled/`` is left as it was.

    Returns:
        ``{"imported": n, "per_class": {...}, "new_classes": [...]}``.
    """
    from transferlab.layout import LABELLED_DIR

    accepted = validate(params, root, csv_path, new_classes=new_classes)
    before = known_classes(root)
    dest_root = root / LABELLED_DIR
    dest_root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".import-", dir=dest_root))
    moved: list[Path] = []
    try:
        plan = []
        for a in accepted:
            ext = a["path"].suffix.lower() or ".img"
            tmp = stage / f"{a['sha256'][:16]}{ext}"
            tmp.write_bytes(a["data"])
            plan.append((tmp, dest_root / a["label"] / tmp.name))
        for tmp, dest in plan:
            dest.parent.mkdir(exist_ok=True)
            os.replace(tmp, dest)
            moved.append(dest)
    except BaseException:
        for dest in moved:
            dest.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    per_class = dict(sorted(Counter(a["label"] for a in accepted).items()))
    added = sorted(set(per_class) - before)
    log.info(
        "imported %d image(s) into %s (%s); run `dvc repro` (or `transferlab run`) to retrain",
        len(accepted),
        dest_root,
        ", ".join(f"{c}: {k}" for c, k in per_class.items()),
    )
    return {"imported": len(accepted), "per_class": per_class, "new_classes": added}
