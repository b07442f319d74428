import subprocess
import sys

import yaml

from tests.conftest import REPO
from transferlab.stages import STAGES


def _paths(entries) -> set[str]:
    return {e if isinstance(e, str) else next(iter(e)) for e in entries or []}


def test_dvc_yaml_mirrors_the_stage_registry():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == list(STAGES)
    for name, stage in STAGES.items():
        spec = dvc[name]
        assert spec["cmd"] == f"transferlab {name}"
        assert _paths(spec.get("deps")) - {"${data.source.path}"} == set(stage.deps), name
        assert _paths(spec.get("outs")) == set(stage.outs), name
        assert set(spec.get("params", [])) == set(stage.params), name
        assert _paths(spec.get("metrics")) == set(stage.metrics), name
        assert _paths(spec.get("plots")) == set(stage.plots), name


def test_the_library_never_imports_prefect():
    code = (
        "import sys, transferlab.stages, transferlab.cli, transferlab.tracking, "
        "transferlab.features, transferlab.evaluate; print('prefect' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
