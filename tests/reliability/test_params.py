"""Bad params: one line naming the key and the fix, exit code 2, and no output touched."""

from __future__ import annotations

import pytest
import yaml

from tests.reliability.cases import Case
from tests.reliability.conftest import cli, error_lines, tree_digest

INTACT = "every file in the workspace (data, features, models, metrics, reports)"


def _edit(section: str, key: str, value):
    def apply(params: dict) -> str:
        params.setdefault(section, {})[key] = value
        return yaml.safe_dump(params)

    return apply


CASES = [
    Case(
        "params-unknown-top-key", "a top-level key nobody knows", "exit 2, names it", INTACT
    ).param(
        lambda p: yaml.safe_dump({**p, "trainig": {}}), ["unknown key 'trainig'", "allowed keys"]
    ),
    Case(
        "params-unknown-deep-key", "a typo two levels down", "exit 2, names the path", INTACT
    ).param(
        lambda p: yaml.safe_dump(
            {**p, "data": {**p["data"], "source": {**p["data"]["source"], "pth": "x"}}}
        ),
        ["data.source.pth"],
    ),
    Case("params-wrong-type", "batch_size: many", "exit 2, says integer", INTACT).param(
        _edit("features", "batch_size", "many"), ["features.batch_size", "integer"]
    ),
    Case("params-negative-eps", "eps -0.1", "exit 2, says [0, 1]", INTACT).param(
        _edit("attack", "eps", [-0.1]), ["attack.eps", "outside [0, 1]"]
    ),
    Case("params-eps-above-one", "eps 3", "exit 2, says [0, 1]", INTACT).param(
        _edit("attack", "eps", [3]), ["attack.eps", "outside [0, 1]"]
    ),
    Case("params-eps-unparsable", "eps '4/2x5'", "exit 2, shows the fraction form", INTACT).param(
        _edit("attack", "eps", ["4/2x5"]), ["attack.eps", "'4/255'"]
    ),
    Case("params-unknown-backbone", "backbone alexnet9", "exit 2, lists backbones", INTACT).param(
        _edit("features", "backbone", "alexnet9"), ["features.backbone", "allowed values"]
    ),
    Case("params-unknown-attack", "attacks [deepfool9]", "exit 2, lists attacks", INTACT).param(
        _edit("attack", "attacks", ["deepfool9"]), ["attack.attacks", "allowed values"]
    ),
    Case("params-unknown-method", "models [knn]", "exit 2, lists methods", INTACT).param(
        _edit("attack", "models", ["knn"]), ["attack.models", "allowed values"]
    ),
    Case("params-empty-file", "params.yaml is empty", "exit 2, says empty", INTACT).param(
        lambda p: "", ["the file is empty"]
    ),
    Case("params-invalid-yaml", "unclosed bracket", "exit 2, line and column", INTACT).param(
        lambda p: "svm: {C: [1, 2\n", ["invalid YAML", "line"]
    ),
]


@pytest.mark.parametrize(("case", "make_params", "expected"), CASES)
def test_bad_params_fail_with_one_line_and_touch_nothing(
    case, make_params, expected, workspace_copy
):
    params_file = workspace_copy / "params.yaml"
    params_file.write_text(make_params(yaml.safe_load(params_file.read_text())))
    before = tree_digest(workspace_copy, skip=("params.yaml",))
    for stage in ("split", "attack"):
        proc = cli(stage, cwd=workspace_copy)
        assert proc.returncode == 2, proc.stderr
        lines = error_lines(proc.stderr)
        assert len(lines) == 1, proc.stderr
        assert "params.yaml" in lines[0]
        for part in expected:
            assert part in lines[0]
    assert tree_digest(workspace_copy, skip=("params.yaml",)) == before


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "params-missing-file", "--params points nowhere", "exit 2, says how to fix", INTACT
        ).param()
    ],
)
def test_missing_params_file(case, workspace_copy):
    before = tree_digest(workspace_copy)
    proc = cli("features", "--params", "nope.yaml", cwd=workspace_copy)
    assert proc.returncode == 2
    (line,) = error_lines(proc.stderr)
    assert "nope.yaml" in line and "--params" in line
    assert tree_digest(workspace_copy) == before
