"""The side pipelines under experiments/ are frozen with their dvc.lock versioned (docs/dvc.md):
`dvc status` stays clean on a fresh clone only while each lock names the committed results."""

from __future__ import annotations

import hashlib

import pytest
import yaml

from tests.conftest import REPO

PIPELINES = sorted(REPO.glob("experiments/*/dvc.yaml"))


def test_there_are_side_pipelines():
    assert len(PIPELINES) >= 2, PIPELINES  # learning_curve, active_learning


@pytest.mark.parametrize("dvc_yaml", PIPELINES, ids=lambda p: p.parent.name)
def test_every_stage_is_frozen_and_its_lock_names_the_committed_results(dvc_yaml):
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    lock_path = dvc_yaml.with_name("dvc.lock")
    assert lock_path.exists(), f"{lock_path} is missing: dvc commit -f {dvc_yaml.relative_to(REPO)}"
    locked = yaml.safe_load(lock_path.read_text())["stages"]
    assert set(locked) == set(stages)
    for name, stage in stages.items():
        # not frozen: every params.yaml change would show it as stale in `dvc status`
        assert stage.get("frozen") is True, name
        outs = locked[name]["outs"]
        assert outs, name
        for out in outs:
            digest = hashlib.md5((REPO / out["path"]).read_bytes()).hexdigest()
            assert digest == out["md5"], (
                f"{out['path']} changed: dvc commit -f {dvc_yaml.relative_to(REPO)}"
            )
