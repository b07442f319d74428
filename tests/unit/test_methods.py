"""The method registry: a fourth method, registered in four places, flows through the config,
the stages, the dvc.yaml check, the CLI, the Prefect tasks' tags and the attack models."""

import subprocess
import sys
import textwrap

import pytest
import yaml

from tests.conftest import REPO
from transferlab.methods import METHODS, Method, register

# Place 1: the method's module (its stage body). Place 2: its section and registry entry.
MODULE = """
from transferlab.atomic import write_json
from transferlab.methods import METHODS, Method, register
from transferlab.section import Section


class EchoParams(Section):
    answer: int = 1


def run(params, root):
    m = METHODS["echo"]
    write_json(root / m.metrics_file, {"answer": params.echo.answer})
    return {"answer": params.echo.answer}


register(Method(name="echo", params=EchoParams, run="echo_method:run",
                summary="A throwaway method: echoes its params.", reads=("features",)))
"""

# Place 3: its params.yaml section; place 4: its dvc.yaml stage (next to the real ones).
CHECK = """
import json, sys, yaml
from pathlib import Path
import echo_method  # registers before the config is built
from transferlab.config import load_params, ParamsError
from transferlab.stages import STAGES, check_dvc_yaml
from transferlab_flows.tasks.stages import HEAVY_STAGES
import typer
from transferlab.cli import app

tmp = Path(sys.argv[1])
params = load_params(tmp / "params.yaml")
dvc = yaml.safe_load((tmp / "dvc.yaml").read_text())["stages"]
summary = STAGES["echo"].run(params, tmp)
try:
    load_params(tmp / "bad.yaml")
    bad = None
except ParamsError as e:
    bad = str(e)
print(json.dumps({
    "stages": list(STAGES), "echo_params": list(STAGES["echo"].params),
    "attack_deps": list(STAGES["attack"].deps), "report_deps": list(STAGES["report"].deps),
    "dvc": check_dvc_yaml(dvc), "summary": summary, "models": list(params.attack.models),
    "written": json.loads((tmp / "metrics/echo.json").read_text()), "bad": bad,
    "heavy": "echo" in HEAVY_STAGES, "cli": "echo" in typer.main.get_command(app).commands,
}))
"""


def test_a_fourth_method_registers_in_four_places(tmp_path):
    (tmp_path / "echo_method.py").write_text(MODULE)
    (tmp_path / "check.py").write_text(CHECK)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["echo"] = {"answer": 42}
    params["attack"]["models"] = ["svm", "echo"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    params["echo"] = {"answr": 42}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(params))
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stages = dvc["stages"]
    echo = {
        "cmd": "transferlab echo",
        "deps": ["features/features.npz", "data/split.csv"],
        "params": ["features", "echo", "split"],
        "outs": ["models/echo"],
        "metrics": [{"metrics/echo.json": {"cache": False}}],
    }
    order = list(stages)
    order.insert(order.index("attack"), "echo")
    stages["echo"] = echo
    stages["attack"]["deps"].insert(0, "models/echo")
    stages["report"]["deps"] += ["metrics/echo.json", "models/echo"]
    dvc["stages"] = {k: stages[k] for k in order}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    out = subprocess.run(
        [sys.executable, str(tmp_path / "check.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    import json

    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["stages"].index("echo") == got["stages"].index("attack") - 1
    assert got["echo_params"] == ["features", "echo", "split"]
    assert "models/echo" in got["attack_deps"]
    assert {"metrics/echo.json", "models/echo"} <= set(got["report_deps"])
    assert got["dvc"] == []
    assert got["summary"] == {"answer": 42} and got["written"] == {"answer": 42}
    assert got["models"] == ["svm", "echo"]
    assert "unknown key 'echo.answr'" in got["bad"] and "answer" in got["bad"]
    assert got["heavy"] and got["cli"]


def test_the_registry_refuses_a_name_twice():
    with pytest.raises(ValueError, match="registered already"):
        register(Method(name="svm", params=METHODS["svm"].params, run="x:y", summary=""))


def test_attack_models_accept_only_attackable_methods(tmp_path):
    from transferlab.config import ParamsError, load_params

    p = tmp_path / "params.yaml"
    p.write_text(textwrap.dedent("attack:\n  models: [svm, nope]\n"))
    with pytest.raises(ParamsError, match=r"unknown model 'nope'; allowed values are \['svm'"):
        load_params(p)
