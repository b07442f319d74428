"""`label suggest`, then `label import`, then `dvc repro`: the new labels become a new data
version, features are extracted only for the new images, and an unchanged repro runs nothing."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, draw_image, tiny_params, write_workspace

pytestmark = pytest.mark.slow

STAGES = ("pull", "split", "features", "svm")  # the data side of dvc.yaml: kept tiny


def sh(*args: str, cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def tl(*args: str, cwd: Path) -> str:
    return sh(sys.executable, "-m", "transferlab.cli", *args, cwd=cwd)


def ran(output: str) -> set[str]:
    return {s for s in STAGES if f"Running stage '{s}'" in output}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_dataset) -> Path:
    ws = write_workspace(tmp_path_factory.mktemp("label_dvc"), tiny_params(tiny_dataset))
    full = yaml.safe_load((REPO / "dvc.yaml").read_text())
    (ws / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {s: full["stages"][s] for s in STAGES}}, sort_keys=False)
    )
    (ws / "labelled").mkdir()
    (ws / "labelled" / ".gitignore").write_text("*\n!.gitignore\n")
    pool = ws / "unlabelled"
    pool.mkdir()
    for c, kind in enumerate(("circles", "squares", "stripes")):
        for i in range(2):
            draw_image(kind, seed=7000 + 10 * c + i).save(pool / f"{kind}_{i}.png")
    sh("git", "init", "-q", cwd=ws)
    sh("dvc", "init", "-q", cwd=ws)
    sh("dvc", "config", "core.analytics", "false", cwd=ws)
    sh("dvc", "config", "core.site_cache_dir", str(ws / ".dvc" / "site_cache"), cwd=ws)
    assert ran(sh("dvc", "repro", cwd=ws)) == set(STAGES)
    return ws


def test_suggest_import_repro_reruns_only_what_changed(workspace):
    ws = workspace
    assert ran(sh("dvc", "repro", cwd=ws)) == set()  # nothing changed: nothing runs

    tl("label", "suggest", "--budget", "3", "--strategy", "margin", "-q", cwd=ws)
    with open(ws / "labels/suggest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(r["guess"] for r in rows)
    for r in rows:
        r["label"] = Path(r["path"]).name.rsplit("_", 1)[0]  # the annotator's answer
    with open(ws / "labels/done.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lock_before = yaml.safe_load((ws / "dvc.lock").read_text())
    split_before = (ws / "data/split.csv").read_text().splitlines()

    tl("label", "import", "labels/done.csv", "-q", cwd=ws)
    assert len([p for p in (ws / "labelled").rglob("*.png")]) == 3
    assert "pull" in sh("dvc", "status", cwd=ws)

    out = sh("dvc", "repro", cwd=ws)
    assert ran(out) == set(STAGES)
    lock_after = yaml.safe_load((ws / "dvc.lock").read_text())

    def data_md5(lock):
        outs = lock["stages"]["pull"]["outs"]
        return next(o["md5"] for o in outs if o["path"] == "data/images")

    assert data_md5(lock_after) != data_md5(lock_before)  # a new DVC data version
    stats = json.loads((ws / ".transferlab/cache/last_run.json").read_text())["features"]
    # suggest extracted the pool's features into the cache: the stage extracts nothing at all
    assert (stats["images"], stats["misses"]) == (27, 0)
    split_after = (ws / "data/split.csv").read_text().splitlines()
    assert set(split_before) <= set(split_after)  # every old image keeps its split
    assert ran(sh("dvc", "repro", cwd=ws)) == set()
