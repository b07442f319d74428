"""Untrusted bytes, caches that must heal, corrupt stage outputs, a full disk under the models,
and a moved workspace. Each class is fed two or more probes; each checks the exit code, the
message, that nothing ran, and that nothing was lost."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.reliability.cases import Case
from tests.reliability.conftest import cli, error_lines, leftovers, tree_digest
from tests.unit.test_tensor_files import plant_pickle

pytestmark = pytest.mark.slow


def _features(ws: Path) -> np.ndarray:
    with np.load(ws / "features/features.npz") as z:
        return z["features"]


def _reseal_meta(folder: Path) -> None:
    """Make meta.json agree with the files beside it again, as an attacker who can write the
    folder would: the digests then lead the loader all the way to the unpickler."""
    from transferlab.classifiers.base import _meta_digest
    from transferlab.data import file_sha256

    meta = json.loads((folder / "meta.json").read_text())
    meta["files"] = {name: file_sha256(folder / name) for name in meta["files"]}
    meta["meta_digest"] = _meta_digest(meta)
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))


def _registered_model_dir(ws: Path, name: str, version: str = "1") -> Path:
    import mlflow

    from transferlab.tracking.store import relocate_moved_store

    # a copied workspace's store still names the original's artifacts until transferlab
    # first opens it (as every transferlab command does)
    relocate_moved_store(f"sqlite:///{ws / 'mlruns.db'}", ws, "mlartifacts")
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlruns.db'}")
    try:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}"))
    finally:
        mlflow.set_tracking_uri(None)
    assert local.is_relative_to(ws), local  # a local store: the files themselves
    return local


# ------------------------------------------------------------------ never unpickle


@pytest.mark.parametrize(
    ("case", "where"),
    [
        Case(
            f"pickle-never-executed[{where}]",
            f"a pickle that runs code, planted as {where}",
            "exit 1, 'refusing to load FILE ... nothing was executed'",
            "no code ran (no marker file), the stored models unchanged",
        ).param(where)
        for where in ("full-checkpoint", "model-file", "mlflow-model", "file-weights")
    ],
)
def test_planted_pickles_never_run(case, where, workspace_copy, tmp_path):
    ws = workspace_copy
    marker = tmp_path / "pwned"
    if where == "full-checkpoint":
        evil = plant_pickle(ws / ".transferlab/checkpoints/full.pt", marker)
        args = ["full"]
    elif where == "model-file":
        evil = plant_pickle(ws / "models/svm/head.pt", marker)
        _reseal_meta(ws / "models/svm")
        args = ["attack"]
    elif where == "mlflow-model":
        folder = next(_registered_model_dir(ws, "tiny-svm").rglob("meta.json")).parent
        evil = plant_pickle(folder / "head.pt", marker)
        _reseal_meta(folder)
        args = ["attack-eval", "tiny-svm/1"]
    else:
        evil = plant_pickle(tmp_path / "weights.pth", marker)
        params = yaml.safe_load((ws / "params.yaml").read_text())
        params["features"]["pretrained"] = f"file:{evil}"
        (ws / "params.yaml").write_text(yaml.safe_dump(params))
        args = ["features"]
    before = tree_digest(ws / "models") | tree_digest(ws / "metrics")
    out = cli(*args, cwd=ws)
    assert out.returncode == 1, out.stderr[-2000:]
    (line,) = error_lines(out.stderr)
    assert "refusing to load" in line and str(evil) in line and "nothing was executed" in line
    assert not marker.exists()
    assert before == tree_digest(ws / "models") | tree_digest(ws / "metrics")


# ------------------------------------------------------------------ caches heal


@pytest.mark.parametrize(
    ("case", "damage"),
    [
        Case(
            f"cache-heals[{damage}]",
            f"a feature-cache shard {damage} under its own name",
            "exit 0: the shard is quarantined and its images extracted again",
            "features.npz equal to the undamaged run's",
        ).param(damage)
        for damage in ("truncated", "rewritten-with-zeros")
    ],
)
def test_a_damaged_cache_shard_heals(case, damage, workspace_copy):
    ws = workspace_copy
    good = _features(ws)
    (shard,) = sorted((ws / ".transferlab/cache").rglob("shard-*.npz"))[:1]
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:  # a valid npz with the same ids and all-zero features
        with np.load(shard) as z:
            ids, feats = z["sha256"], z["features"]
        with open(shard, "wb") as f:
            np.savez(f, sha256=ids, features=np.zeros_like(feats))
    (ws / "features/features.npz").unlink()
    for _ in range(2):  # healed once, and then served from the rebuilt shard
        out = cli("features", cwd=ws)
        assert out.returncode == 0, out.stderr[-2000:]
        np.testing.assert_allclose(_features(ws), good, rtol=0, atol=1e-6)
    assert len(list(shard.parent.glob(".quarantine/*"))) == 1


# ------------------------------------------------------------------ corrupt stage outputs


@pytest.mark.parametrize(
    ("case", "damage"),
    [
        Case(
            f"corrupt-output-named[{damage}]",
            f"a stage output damaged: {damage}",
            "exit 1, one line naming the damaged file and the stage to re-run",
            "the other outputs",
        ).param(damage)
        for damage in ("features.npz-truncated", "meta.json-garbage", "meta.json-classes-swapped")
    ],
)
def test_corrupt_outputs_name_themselves(case, damage, workspace_copy):
    ws = workspace_copy
    if damage == "features.npz-truncated":
        bad = ws / "features/features.npz"
        bad.write_bytes(bad.read_bytes()[:200])
        args = ["svm"]
    else:
        bad = ws / "models/svm/meta.json"
        if damage == "meta.json-garbage":
            bad.write_bytes(b'{"method": "svm", "classes": [\x00\x00')
        else:
            meta = json.loads(bad.read_text())
            meta["classes"][0], meta["classes"][1] = meta["classes"][1], meta["classes"][0]
            bad.write_text(json.dumps(meta, indent=2))
        args = ["attack"]
    before = tree_digest(ws / "metrics")
    out = cli(*args, cwd=ws)
    assert out.returncode == 1, out.stderr[-2000:]
    (line,) = error_lines(out.stderr)
    assert str(bad) in line and "re-run" in line, line
    assert tree_digest(ws / "metrics") == before


# ------------------------------------------------------------------ a full disk under models/


@pytest.mark.parametrize(
    ("case", "stage", "size"),
    [
        Case(
            f"disk-full-models[{stage}]",
            f"models/{stage} sits on a disk that fills up while `transferlab {stage}` saves",
            "exit 1: 'No space left on device while writing models/...'",
            "the metrics, no temp file on the full disk",
        ).param(stage, size)
        for stage, size in (("svm", "12k"), ("full", "1m"))
    ],
)
def test_disk_full_while_saving_a_model(case, stage, size, workspace_copy):
    ws = workspace_copy
    mount = ws / "models" / stage
    shutil.rmtree(mount)
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)]
    ).returncode:
        pytest.fail("could not mount a small tmpfs (the suite runs as root in CI)")
    try:
        before = tree_digest(ws / "metrics")
        out = cli(stage, cwd=ws)
        assert out.returncode == 1, out.stderr[-2000:]
        (line,) = error_lines(out.stderr)
        assert "No space left on device while writing" in line and str(mount) in line, line
        assert "unexpected pos" not in out.stderr
        assert tree_digest(ws / "metrics") == before
        assert leftovers(mount) == [] and not list(mount.glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ------------------------------------------------------------------ a moved workspace


@pytest.mark.parametrize(
    ("case", "command"),
    [
        Case(
            f"moved-workspace[{command}]",
            f"the workspace folder moved, then `transferlab {command}`",
            "exit 0; artifacts land under the new path; every model version loads",
            "the old path is not recreated",
        ).param(command)
        for command in ("report", "attack-eval")
    ],
)
def test_a_moved_workspace_keeps_working(case, command, pipeline_workspace, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(pipeline_workspace, old, ignore=shutil.ignore_patterns("lock"))
    new = tmp_path / "moved" / "ws"
    new.parent.mkdir()
    old.rename(new)
    args = ["report"] if command == "report" else ["attack-eval", "tiny-svm/1"]
    out = cli(*args, cwd=new)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not old.exists()
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{new / 'mlruns.db'}")
    exp = client.get_experiment_by_name("tiny")
    assert exp.artifact_location == (new / "mlartifacts").as_uri()
    for run in client.search_runs([exp.experiment_id]):
        assert run.info.artifact_uri.startswith((new / "mlartifacts").as_uri())
    for mv in client.search_model_versions():
        local = _registered_model_dir(new, mv.name, mv.version)
        meta = next(local.rglob("meta.json"))
        assert hashlib.sha256(meta.read_bytes()).hexdigest()  # readable, in the new place
        assert meta.is_relative_to(new)
