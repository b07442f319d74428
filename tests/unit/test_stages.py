import subprocess
import sys

import yaml

from tests.conftest import REPO
from transferlab.stages import check_dvc_yaml


def test_dvc_yaml_mirrors_the_stage_registry():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert check_dvc_yaml(dvc) == []
    # the check catches a drift: a method stage that forgot a params section
    dvc["top"]["params"].remove("split")
    assert check_dvc_yaml(dvc) == [
        "top: params ['data', 'features', 'top'] != ['data', 'features', 'split', 'top']"
    ]


def test_the_library_never_imports_prefect():
    code = (
        "import sys, transferlab.stages, transferlab.cli, transferlab.tracking, "
        "transferlab.features, transferlab.evaluate; print('prefect' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
