"""DVC exactly as a new user runs it: `git clone` the repository, then the DVC commands of its
docs (repro, a no-op repro, status, metrics, params diff, plots, exp run/show/apply, push/pull),
on tiny params committed in the clone. The plots page is then opened in Chromium offline.

The clone is of the committed HEAD: what a user gets, not the working tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tiny_params
from tests.integration.browser import OFFLINE, chromium

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def dvc_files(repo: Path) -> list[str]:
    """Every pipeline in the clone: dvc.yaml and the frozen side pipelines under experiments/,
    whose results and locks are committed (docs/dvc.md)."""
    listed = subprocess.run(
        ["git", "ls-files", "dvc.yaml", "*/dvc.yaml"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "dvc.yaml" in listed and len(listed) >= 3, listed
    return listed


def clean_status(repo: Path, env: dict) -> dict:
    """`dvc status` of every pipeline, one by one and repo-wide: target -> its JSON."""
    found = {}
    for target in [*dvc_files(repo), None]:
        status = subprocess.run(
            ["dvc", "status", "--json", *([target] if target else [])],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
        )
        assert status.returncode == 0, status.stderr
        found[target or "repo"] = json.loads(status.stdout)  # frozen-stage warnings: stderr
    return found


def sh(*args: str, cwd: Path, env: dict, timeout: float = 1800) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def clone(tmp_path_factory, tiny_dataset):
    """The repository cloned, its params set to the tiny dataset (committed), `dvc repro` run
    and its lock and metrics committed, the way the DVC docs version them."""
    tmp = tmp_path_factory.mktemp("dvc_clone")
    repo = tmp / "repo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env.update(
        PYTHONPATH=str(repo),  # the clone's code, not this checkout's
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
    )
    sh("git", "clone", "-q", str(REPO), str(repo), cwd=tmp, env=env)
    params = tiny_params(tiny_dataset, attack={"models": ["svm", "full"], "attacks": ["fgsm"]})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "commit", "-qam", "tiny params", cwd=repo, env=env)
    sh("dvc", "remote", "add", "--local", "-d", "scratch", str(tmp / "remote"), cwd=repo, env=env)
    sh("dvc", "repro", cwd=repo, env=env)
    started = time.monotonic()
    noop = sh("dvc", "repro", cwd=repo, env=env)
    noop_seconds = time.monotonic() - started
    status = clean_status(repo, env)
    sh("git", "add", "dvc.lock", "metrics", "plots/robustness.csv", cwd=repo, env=env)
    sh("git", "commit", "-qm", "pipeline results", cwd=repo, env=env)
    return {
        "repo": repo,
        "env": env,
        "tmp": tmp,
        "noop": noop,
        "noop_seconds": noop_seconds,
        "status": status,
    }


def dvc_json(clone, *args: str):
    out = subprocess.run(
        ["dvc", *args, "--json"],
        cwd=clone["repo"],
        env=clone["env"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def champion(clone) -> str:
    import mlflow

    uri = f"sqlite:///{clone['repo'] / 'mlruns.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    return str(client.get_model_version_by_alias("tiny-svm", "champion").version)


def test_repro_then_a_no_op_repro_then_a_clean_status(clone):
    assert "Running stage" not in clone["noop"] and "up to date" in clone["noop"]
    print(f"no-op dvc repro: {clone['noop_seconds']:.2f} s")  # the benchmark reports the ratio
    assert clone["status"] == dict.fromkeys(clone["status"], {}), clone["status"]
    repo = clone["repo"]
    git_status = sh("git", "status", "--porcelain", cwd=repo, env=clone["env"])
    assert git_status.strip() == "", git_status  # every output is versioned or ignored


def test_metrics_show_reads_every_metrics_file(clone):
    metrics = dvc_json(clone, "metrics", "show")
    files = metrics[""]["data"]
    for name in ("svm", "top", "full", "attack"):
        data = files[f"metrics/{name}.json"].get("data")
        assert data, name
    # the transfer matrix is a list of rows: read without error, no scalar to show
    assert "error" not in files["metrics/transfer.json"]
    assert files["metrics/svm.json"]["data"]["test_acc"] >= 0.5


def test_plots_show_writes_an_offline_page_to_an_ignored_folder(clone):
    repo = clone["repo"]
    out = sh("dvc", "plots", "show", cwd=repo, env=clone["env"])
    page = repo / "reports/dvc_plots/index.html"
    assert page.as_uri() in out
    html = page.read_text()
    assert "vegaEmbed" in html and "cdn.jsdelivr" not in html and "<script src=" not in html
    assert sh("git", "status", "--porcelain", cwd=repo, env=clone["env"]).strip() == ""


# Painted pixels of the canvas vega-embed draws in the robustness plot's div (0: not drawn).
PAINTED = """
const div = Array.from(document.querySelectorAll('div[id]')).find(d => d.id.includes('robustness'));
const c = div && div.querySelector('canvas');
if (!c || !c.width) return 0;
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let n = 0;
for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
return n;
"""


def test_plots_page_renders_the_robustness_plot_with_the_network_blocked(clone, tmp_path):
    page = clone["repo"] / "reports/dvc_plots/index.html"
    if not page.exists():
        sh("dvc", "plots", "show", cwd=clone["repo"], env=clone["env"])
    driver = chromium(tmp_path / "profile", *OFFLINE, width=1400, height=1200)
    try:
        driver.get(page.as_uri())
        deadline = time.monotonic() + 30
        painted = 0
        while time.monotonic() < deadline and painted < 1000:
            painted = driver.execute_script(PAINTED)
            time.sleep(0.5)
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        resources = driver.execute_script(
            "return performance.getEntriesByType('resource').map(r => r.name)"
        )
        driver.save_screenshot(str(tmp_path / "dvc_plots.png"))
    finally:
        driver.quit()
    assert painted >= 1000, "the robustness plot did not render"
    assert errors == []
    assert [r for r in resources if not r.startswith(("file:", "data:"))] == []


def test_exp_run_fills_exp_show_and_leaves_the_champion(clone):
    repo, env = clone["repo"], clone["env"]
    # a person promotes on purpose (outside DVC), then experiments run
    sh("transferlab", "gate", "-q", cwd=repo, env=env)
    before = champion(clone)
    sh("dvc", "exp", "run", "-n", "c-small", "-S", "svm.C=[0.1,1.0]", cwd=repo, env=env)
    assert champion(clone) == before

    shown = dvc_json(clone, "exp", "show")
    exps = [e for row in shown for e in (row.get("experiments") or [])]
    (exp,) = [e for e in exps if e.get("name") == "c-small"]
    data = exp["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["svm"]["C"] == [0.1, 1.0]
    for name in ("svm", "top", "full", "attack"):
        metric = data["metrics"][f"metrics/{name}.json"]
        assert metric.get("data") and "error" not in metric, (name, metric)
    assert "error" not in data["metrics"]["metrics/transfer.json"]
    baseline = next(row for row in shown if row.get("rev") != "workspace")["data"]
    assert baseline["metrics"]["metrics/svm.json"]["data"]["test_acc"] is not None

    # the workspace holds the experiment's results: params diff against the commit shows it
    diff = dvc_json(clone, "params", "diff")
    assert diff["params.yaml"]["svm.C"]["new"] in (
        [0.1, 1.0],
        "[0.1, 1.0]",
    )  # the JSON renders lists

    sh("git", "checkout", "--", ".", cwd=repo, env=env)  # back to the committed baseline
    sh("dvc", "checkout", "-q", cwd=repo, env=env)
    sh("dvc", "exp", "apply", "c-small", cwd=repo, env=env)
    assert yaml.safe_load((repo / "params.yaml").read_text())["svm"]["C"] == [0.1, 1.0]

    import mlflow

    uri = f"sqlite:///{repo / 'mlruns.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id],
        filter_string="tags.`dvc.experiment` = 'c-small' and tags.`transferlab.run_type` = "
        "'pipeline'",
    )
    (run,) = runs
    assert run.data.tags["transferlab.run_kind"] == "dvc-experiment"
    assert run.info.run_name.startswith("exp c-small: ") and "svm.C=[0.1, 1.0]" in run.info.run_name


def test_push_then_pull_restores_the_outputs(clone):
    repo, env = clone["repo"], clone["env"]
    sh("dvc", "push", cwd=repo, env=env)
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "models")
    shutil.rmtree(repo / "features")
    sh("dvc", "pull", cwd=repo, env=env)
    assert (repo / "models/svm").is_dir() and (repo / "features/features.npz").is_file()
    status = clean_status(repo, env)
    assert status == dict.fromkeys(status, {}), status
