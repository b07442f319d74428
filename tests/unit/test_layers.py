"""The import graph, read from the source itself: layers point down, and nothing cycles.

Layers, bottom to top: ``transferlab`` (the library) <- ``transferlab_flows.tasks`` (Prefect
tasks) <- ``transferlab_flows`` (the flows). The library runs without the orchestration tools
(Prefect, Dask, Ray, DVC); the CLI reaches the flows only through ``importlib`` at call time.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tiny_params

LIBRARY = "transferlab"
TASKS = "transferlab_flows.tasks"
FLOWS = "transferlab_flows"
# Third-party packages only the orchestration layer may import (the optional extras).
ORCHESTRATION = frozenset(
    {"prefect", "prefect_dask", "prefect_ray", "dask", "distributed", "ray", "dvc", "dvc_s3"}
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, module: str, is_package: bool):
    """(imported name, at module level?) for every import statement, wherever it sits; names
    imported only for type checking are left out, since they never run."""
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST, top: bool):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                yield from visit(child, top)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, top
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # the submodule pkg.sub when there is one, else pkg (resolved by the caller)
                yield f"{base}.{alias.name}", top
        inner = top and not isinstance(
            node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef
        )
        for child in ast.iter_child_nodes(node):
            yield from visit(child, inner)

    for stmt in tree.body:
        yield from visit(stmt, True)


def import_graph() -> dict[str, dict[str, bool]]:
    """module -> {imported module or external top-level name: imported at module level?}.

    Our own names resolve to the deepest module that exists (``from a.b import c`` is ``a.b.c``
    when c is a module, else ``a.b``); external ones to their top-level package.
    """
    files = [p for top in (LIBRARY, FLOWS) for p in sorted((REPO / top).rglob("*.py"))]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, dict[str, bool]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: dict[str, bool] = {}
        for target, top in _imports(tree, name, path.name == "__init__.py"):
            if target.split(".")[0] in (LIBRARY, FLOWS):
                while target not in modules:
                    target = target.rpartition(".")[0]
            else:
                target = target.split(".")[0]
            if target and target != name and target != "__future__":
                edges[target] = edges.get(target, False) or top
        graph[name] = edges
    return graph


def layer(module: str) -> str | None:
    if module == LIBRARY or module.startswith(LIBRARY + "."):
        return "library"
    if module == TASKS or module.startswith(TASKS + "."):
        return "tasks"
    if module == FLOWS or module.startswith(FLOWS + "."):
        return "flows"
    return None


RANK = {"library": 0, "tasks": 1, "flows": 2}


def cycles(graph: dict[str, dict[str, bool]], within: str) -> list[list[str]]:
    """Every strongly connected component of more than one module among ``within``'s modules
    (Tarjan's algorithm), each as a sorted list: a cycle however the imports are placed."""
    nodes = [m for m in graph if layer(m) == within]
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in graph or layer(w) != within:
                continue
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in nodes:
        if v not in index:
            connect(v)
    return found


def upward_imports(graph: dict[str, dict[str, bool]]) -> list[str]:
    """Imports that point up a layer, or reach an orchestration tool from below the flows."""
    bad = []
    for module, edges in graph.items():
        here = layer(module)
        for target, top in edges.items():
            there = layer(target)
            where = "module level" if top else "in a function"
            if there is not None and RANK[there] > RANK[here]:
                bad.append(f"{module} imports {target} ({where}): {here} below {there}")
            elif there is None and target in ORCHESTRATION and here == "library":
                bad.append(f"{module} imports {target} ({where}): the library needs no extras")
            elif target in {"prefect_dask", "prefect_ray", "dask", "distributed", "ray"} and (
                here != "flows"
            ):
                bad.append(f"{module} imports {target}: task runners belong to the flows")
            elif target in {"tasks", "flows"}:
                bad.append(f"{module} imports {target}: now transferlab_flows(.tasks)")
    return bad


# ------------------------------------------------------------------ the checks themselves


def test_no_import_cycles_in_any_layer():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the package (a wrong root would pass vacuously)
    for name in RANK:
        assert cycles(graph, name) == [], f"import cycles in the {name} layer"


def test_layers_only_import_downwards():
    assert upward_imports(import_graph()) == []


def test_the_checks_catch_what_they_are_meant_to():
    """A cycle, an upward import and a library import of Prefect, planted in a copy of the
    graph, are each reported (so a bug in the walk cannot pass the checks above silently)."""
    graph = import_graph()
    graph["transferlab.atomic"] = {**graph["transferlab.atomic"], "transferlab.stages": False}
    graph["transferlab.stages"] = {**graph["transferlab.stages"], "transferlab.atomic": True}
    planted = {"transferlab.atomic", "transferlab.stages"}
    assert any(planted <= set(c) for c in cycles(graph, "library"))
    graph["transferlab.config"] = {"transferlab_flows.pipeline": False, "prefect": True}
    graph["transferlab_flows.tasks.stages"] = {"transferlab_flows.pipeline": True, "tasks": True}
    bad = "\n".join(upward_imports(graph))
    assert "transferlab.config imports transferlab_flows.pipeline (in a function)" in bad
    assert "transferlab.config imports prefect (module level)" in bad
    assert "transferlab_flows.tasks.stages imports transferlab_flows.pipeline" in bad
    assert "transferlab_flows.tasks.stages imports tasks: now" in bad


def test_the_graph_resolves_relative_and_submodule_imports():
    graph = import_graph()
    # `from transferlab.data import idx` inside a function: the submodule, not the package
    assert "transferlab.data.idx" in graph["transferlab.data.sources"]
    assert graph["transferlab.data.sources"]["transferlab.config"] is True
    assert graph["transferlab_flows.pipeline"]["prefect"] is True


def test_only_the_flows_package_is_installed_besides_the_library():
    """`tasks` and `flows` are not generic top-level packages of the distribution."""
    text = (REPO / "pyproject.toml").read_text()
    assert not [*REPO.glob("tasks/*.py"), *REPO.glob("flows/*.py")]
    import tomllib

    project = tomllib.loads(text)
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {i.split(".")[0].rstrip("*") for i in include} == {LIBRARY, FLOWS}
    deps = " ".join(project["project"]["dependencies"]).lower()
    for tool in ("prefect", "dask", "ray", "dvc"):
        assert tool not in deps, f"{tool} is a hard dependency of the library"
    extras = project["project"]["optional-dependencies"]
    assert {"orchestrate", "dask", "ray", "dvc", "all"} <= set(extras)
    # what `make install` (and so CI) installs covers every extra the tests use
    assert "'.[all,dev]'" in (REPO / "Makefile").read_text()


# ------------------------------------------------------------------ the bare library, run


# Runs in a fresh interpreter where the orchestration tools cannot be imported, as after a
# plain `pip install transferlab`: every library module imports, a tiny pipeline pulls, trains
# and attacks, and `transferlab run` says which extra it needs.
_BARE = """
import importlib, importlib.abc, pkgutil, sys
from pathlib import Path

BLOCKED = set({blocked!r})

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, Block())
import transferlab
for info in pkgutil.walk_packages(transferlab.__path__, "transferlab."):
    importlib.import_module(info.name)

from transferlab.config import load_params
from transferlab.stages import STAGES
ws = Path({workspace!r})
params = load_params(ws / "params.yaml")
for name in ("pull", "split", "features", "svm", "attack"):
    print(name, STAGES[name].run(params, ws))
leaked = sorted({{m.split(".")[0] for m in sys.modules}} & BLOCKED)
assert not leaked, leaked

import os
os.chdir(ws)
sys.argv = ["transferlab", "run"]
from transferlab.cli import main
main()
"""


@pytest.mark.slow
def test_the_library_imports_trains_and_attacks_without_the_orchestration_extras(
    tmp_path, tiny_dataset
):
    params = tiny_params(
        tiny_dataset,
        features={"pretrained": "none"},  # random weights: the point is the imports
        attack={"models": ["svm"], "eps": ["0", "8/255"], "transfer": {"sources": []}},
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    script = _BARE.format(blocked=sorted(ORCHESTRATION), workspace=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"},
        timeout=600,
    )
    assert "attack {" in proc.stdout, proc.stderr[-3000:]
    # the CLI's flow command fails with one line naming the missing extra
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "pip install 'transferlab[orchestrate]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "metrics/attack.json").is_file()
