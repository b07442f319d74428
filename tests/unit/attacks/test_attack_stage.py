"""The attack stage on a tiny workspace with the real Lite0, and the FGSM demo on a real photo."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import yaml
from PIL import Image

from tests.conftest import REPO, tiny_params, write_workspace
from transferlab.config import load_params
from transferlab.stages import STAGES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def attacked(tmp_path_factory, tiny_dataset):
    attack = {
        "eps": ["0", "8/255"],
        "max_images": 4,
        "batch_size": 2,
        "models": ["svm"],
        "attacks": ["fgsm", "square"],
        "square": {"max_queries": 4},
        "grid_images": 2,
        "transfer": {"sources": ["imagenet", "svm"], "attack": "fgsm", "eps": "8/255"},
    }
    ws = write_workspace(
        tmp_path_factory.mktemp("attack_ws"), tiny_params(tiny_dataset, attack=attack)
    )
    params = load_params(ws / "params.yaml")
    for name in ("pull", "split", "features", "svm"):
        STAGES[name].run(params, ws)
    with count_work() as work:
        summary = STAGES["attack"].run(params, ws)
    return ws, params, summary, work


@contextlib.contextmanager
def count_work():
    """Count model loads (by name) and image decodes (calls, images) while the block runs."""
    import transferlab.features
    import transferlab.robustness

    work = {"loads": Counter(), "decodes": []}
    load, decode = transferlab.robustness.load_attack_model, transferlab.features.load_images

    def counting_load(params, root, name):
        work["loads"][name] += 1
        return load(params, root, name)

    def counting_decode(paths, *args, **kwargs):
        work["decodes"].append(len(paths))
        return decode(paths, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transferlab.robustness, "load_attack_model", counting_load)
        mp.setattr(transferlab.features, "load_images", counting_decode)
        yield work


def test_attack_stage_loads_each_model_and_decodes_the_test_set_once(attacked) -> None:
    _, params, summary, work = attacked
    # attacked: svm; transfer sources: imagenet and svm; grid: svm
    assert work["loads"] == {"svm": 1, "imagenet": 1}
    # one decode of the test images, shared by the sweep, the transfer matrix and the grid
    assert work["decodes"] == [params.attack.max_images]


def test_a_batch_task_decodes_only_its_batch(attacked) -> None:
    from transferlab.robustness import num_batches, sweep_batch

    ws, params, _, _ = attacked
    assert num_batches(params, ws) == 2
    with count_work() as work:
        done = sweep_batch(params, ws, "svm", 1)  # shards are stored: read back, not recomputed
    assert done == params.attack.batch_size == 2
    assert work["decodes"] == [2] and work["loads"] == {"svm": 1}


def test_attack_stage_outputs(attacked) -> None:
    ws, params, summary, _ = attacked
    assert summary["sanity_failures"] == 0 and summary["rows"] == 4
    metrics = json.loads((ws / "metrics/attack.json").read_text())
    assert not [f for f in metrics["sanity"] if f["level"] == "fail"]
    # the grid's rows, for the HTML report's caption: every model and attack
    assert metrics["grid"] == [{"model": "svm", "attack": a} for a in ("fgsm", "square")]
    curve = metrics["summary"]["svm"]["fgsm"]
    assert curve["eps_0/255"] == pytest.approx(metrics["summary"]["svm"]["clean_acc"])
    matrix = json.loads((ws / "metrics/transfer.json").read_text())["matrix"]
    assert [(r["source"], r["target"]) for r in matrix] == [("imagenet", "svm"), ("svm", "svm")]
    assert all(r["robust_acc"] <= r["clean_acc"] for r in matrix)
    for png in ("plots/transfer.png", "plots/adversarial_examples.png"):
        with Image.open(ws / png) as im:
            assert im.size[0] > 300
    csv_text = (ws / "plots/robustness.csv").read_text()
    assert "svm/square" in csv_text and "queries_median" in csv_text


def test_attack_stage_resumes_from_shards(attacked) -> None:
    from transferlab.robustness import AttackSession

    ws, params, _, _ = attacked
    shards = sorted((ws / params.attack.work_dir).rglob("*.json"))
    # 2 attacks x 2 eps (0 included) x 2 batches
    assert len(shards) == 8
    stamps = [p.stat().st_mtime_ns for p in shards]
    rows = [r for r in _csv_rows(ws) if r["model"] == "svm"]
    shards[0].unlink()  # as if killed before this shard finished
    again, _ = AttackSession(params, ws).sweep("svm")
    after = sorted((ws / params.attack.work_dir).rglob("*.json"))
    assert len(after) == 8
    assert [p.stat().st_mtime_ns for p in after[1:]] == stamps[1:]  # only the lost one redone
    assert [r["robust_acc"] for r in again] == [float(r["robust_acc"]) for r in rows]


def _csv_rows(ws) -> list[dict]:
    import csv

    with open(ws / "plots/robustness.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_dvc_plots_show_draws_every_series(attacked, tmp_path) -> None:
    ws, _, _, _ = attacked
    repo = tmp_path / "repo"
    (repo / "plots").mkdir(parents=True)
    shutil.copy(ws / "plots/robustness.csv", repo / "plots/robustness.csv")
    shutil.copytree(REPO / "dvc_plots", repo / "dvc_plots")
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    spec = next(
        p for p in dvc["stages"]["attack"]["plots"] if next(iter(p)) == "plots/robustness.csv"
    )
    stage = {"stages": {"attack": {"cmd": "true", "plots": [spec]}}}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(stage))
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "dvc", *a], cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert run("init", "--no-scm", "-q").returncode == 0
    out = run("plots", "show", "--json")
    assert out.returncode == 0, out.stderr
    (plot,) = json.loads(out.stdout)["data"]["plots/robustness.csv"]
    series = {d["series"] for d in plot["content"]["data"]["values"]}
    assert series == {"svm/fgsm", "svm/square"}
    assert plot["content"]["encoding"]["color"]["field"] == "series"


def test_fgsm_demo_on_the_coffee_photo(tmp_path) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    photo = tmp_path / "coffee.png"
    Image.fromarray(skimage_data.coffee()).save(photo)
    png = tmp_path / "demo.png"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "transferlab.cli",
            "demo",
            "fgsm",
            str(photo),
            "--eps",
            "2/255",
            "--out",
            str(png),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    before, after = (line for line in out.stdout.splitlines() if "FGSM eps=2/255" in line)
    assert "before" in before and before.split(": ", 1)[1].startswith("espresso")
    p_before = float(before.split("espresso ", 1)[1].split("%")[0])
    p_after = float(after.split("espresso ", 1)[1].split("%")[0]) if "espresso" in after else 0.0
    # Measured: espresso 95.7% -> 23.9% at 2/255 (still top-1; 8/255 is needed to flip it).
    assert p_after < p_before / 2
    assert png.stat().st_size > 10_000
