"""Data-parallel training (``classifiers/distributed.py``): 2 CPU processes under torchrun (gloo)
train the same weights as 1 process from the same global batch and seed, and a checkpoint
written at one world size resumes at the other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from transferlab.classifiers import distributed
from transferlab.methods import AdvParams, FullParams

# 11 images in global batches of 5: shards of 3 + 2, and a last batch of 1 that leaves rank 1
# of 2 without images. Augmentation on, fp32 (bf16 would round the comparison away).
PARAMS = FullParams(
    epochs=2,
    image_size=32,
    batch_size=5,
    augment=True,
    lr=0.05,
    backbone_lr_ratio=1.0,
    precision="fp32",
    patience=5,
)


def run_jobs(out: Path, jobs: list[dict]) -> None:
    """Each job trains a random-weight Lite0 with ``train_full`` on fixed data; rank 0 saves its
    weights and history to ``out/<name>.pt``, and a copy of its first epoch's checkpoint to
    ``keep_first`` (what a run killed then leaves). In-process, or in every rank under torchrun
    (``__main__`` below)."""
    import shutil

    from transferlab.classifiers.full import train_full

    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(11, 3, 32, 32, generator=g), torch.arange(11) % 3
    xv, yv = torch.rand(6, 3, 32, 32, generator=g), torch.arange(6) % 3
    for job in jobs:
        torch.manual_seed(distributed.rank() * job.get("rank_seed", 0))
        backbone = _backbone()

        checkpoint = Path(job["checkpoint"])

        def hook(row, keep=job.get("keep_first"), src=checkpoint):
            if keep and row["epoch"] == 0 and distributed.is_main():
                Path(keep).parent.mkdir(exist_ok=True)
                shutil.copy(src, keep)

        res = train_full(
            backbone=backbone,
            n_classes=3,
            params=PARAMS,
            x_train=x,
            y_train=y,
            x_val=xv,
            y_val=yv,
            checkpoint=checkpoint,
            fingerprint="test",
            on_epoch_end=hook,
        )
        if distributed.is_main():
            state = {
                **{f"b.{k}": v for k, v in backbone.state_dict().items()},
                **{f"h.{k}": v for k, v in res.head.state_dict().items()},
            }
            history = [{k: v for k, v in h.items() if k != "seconds"} for h in res.history]
            torch.save(
                {"state": state, "resumed_from": res.resumed_from, "history": history},
                out / f"{job['name']}.pt",
            )


@pytest.fixture
def one_thread():
    """In-process training on one thread, like each rank: on a busy 2-core machine a 2-thread
    process runs several times slower than a 1-thread one (its threads wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _torchrun(out: Path, jobs: list[dict], processes: int) -> None:
    """``run_jobs`` in ``processes`` ranks (gloo, 1 thread each) on 127.0.0.1."""
    cmd = distributed.torchrun_command(processes, ["-m", __name__, str(out), json.dumps(jobs)])
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    env.update(distributed.local_env(processes))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def test_two_processes_train_the_weights_of_one_and_resume_across_world_sizes(tmp_path, one_thread):
    ckpt = {k: str(tmp_path / k / "full.pt") for k in ("one", "two", "after1", "after2")}
    # 1 process, keeping its checkpoint after the first epoch (a run killed there)
    run_jobs(tmp_path, [{"name": "one", "checkpoint": ckpt["one"], "keep_first": ckpt["after1"]}])
    # 2 processes: a straight run (rank 1 builds other initial weights; rank 0's are
    # broadcast), keeping its first checkpoint too; then the resume of the 1-process one
    _torchrun(
        tmp_path,
        [
            {
                "name": "two",
                "checkpoint": ckpt["two"],
                "keep_first": ckpt["after2"],
                "rank_seed": 1,
            },
            {"name": "two_from_one", "checkpoint": ckpt["after1"]},
        ],
        2,
    )
    # 1 process again: the resume of the 2-process checkpoint
    run_jobs(tmp_path, [{"name": "one_from_two", "checkpoint": ckpt["after2"]}])

    runs = {p.stem: torch.load(p, weights_only=True) for p in tmp_path.glob("*.pt")}
    one = runs["one"]
    assert one["resumed_from"] == -1 and len(one["history"]) == 2
    torch.manual_seed(0)
    start = {f"b.{k}": v for k, v in _backbone().state_dict().items()}
    moved = _max_diff(start, {k: v for k, v in one["state"].items() if k.startswith("b.")})
    assert moved > 1e-3  # the weights trained: equal because nothing moved would prove nothing
    for name in ("two", "two_from_one", "one_from_two"):
        run = runs[name]
        diff = _max_diff(one["state"], run["state"])
        print(f"{name}: max |w - w_one| = {diff:.3g} (training moved them by up to {moved:.3g})")
        assert diff < 1e-5, (name, diff)
        assert run["resumed_from"] == (-1 if name == "two" else 1), name
        for key in ("train_acc", "val_acc"):
            assert [h[key] for h in run["history"]] == [h[key] for h in one["history"]], name
        assert [h["train_loss"] for h in run["history"]] == pytest.approx(
            [h["train_loss"] for h in one["history"]], rel=1e-5
        )


def test_the_full_stage_in_two_processes_writes_what_one_process_writes(
    tmp_path, tiny_dataset, one_thread
):
    """``full.distributed.processes: 2``: the stage re-launches itself under torchrun, rank 0
    writes the model and metrics, the parent returns its summary and leaves nothing behind."""
    import shutil

    from tests.conftest import tiny_params, write_workspace
    from transferlab.config import load_params
    from transferlab.stages import STAGES

    full = {"epochs": 1, "min_steps": 0, "image_size": 32, "batch_size": 8, "search": {}}
    one_trial = {"svm": {"C": [0.1]}, "top": {"search": {}}, "adv": {"search": {}}}
    spec = tiny_params(
        tiny_dataset, split={"val": 0.25, "test": 0.25}, full={**full, "precision": "fp32"},
        **one_trial,
    )  # fmt: skip
    one = write_workspace(tmp_path / "one", spec)
    for stage in ("pull", "split", "full"):
        one_summary = STAGES[stage].run(load_params(one / "params.yaml"), one)
    two = tmp_path / "two"
    shutil.copytree(one, two, ignore=shutil.ignore_patterns("models", "metrics"))
    spec["full"]["distributed"] = {"processes": 2, "backend": "gloo"}
    write_workspace(two, spec)
    two_summary = STAGES["full"].run(load_params(two / "params.yaml"), two)

    assert two_summary.keys() == one_summary.keys()
    assert two_summary["test_acc"] == one_summary["test_acc"]
    metrics = [json.loads((ws / "metrics/full.json").read_text()) for ws in (one, two)]
    assert metrics[1]["test_pred"] == metrics[0]["test_pred"]
    assert [h["val_acc"] for h in metrics[1]["history"]] == [
        h["val_acc"] for h in metrics[0]["history"]
    ]
    weights = [
        {f"{m}.{k}": v for m in ("backbone", "head")
         for k, v in torch.load(ws / f"models/full/{m}.pt", weights_only=True).items()}
        for ws in (one, two)
    ]  # fmt: skip
    diff = _max_diff(*weights)
    print(f"full stage, 2 processes: max |w - w_one| = {diff:.3g}")
    assert diff < 1e-5
    assert not list((two / distributed.WORK_DIR).iterdir())  # shared images, params: gone
    assert not list((two / ".transferlab/checkpoints").glob("*"))


def test_a_failing_rank_fails_the_stage_with_its_error(tmp_path, tiny_dataset):
    """No data pulled: every rank raises FileNotFoundError; the stage raises it too (so the CLI
    prints one line and Prefect does not retry), and leaves nothing behind."""
    from tests.conftest import tiny_params, write_workspace
    from transferlab.config import load_params
    from transferlab.stages import STAGES

    spec = tiny_params(tiny_dataset, full={"distributed": {"processes": 2, "backend": "gloo"}})
    ws = write_workspace(tmp_path / "ws", spec)
    with pytest.raises(FileNotFoundError, match="split.csv"):
        STAGES["full"].run(load_params(ws / "params.yaml"), ws)
    assert not list((ws / distributed.WORK_DIR).iterdir())


def _backbone():
    from transferlab.backbones import load_backbone

    return load_backbone("efficientnet_lite0", "none")


def test_a_process_group_of_one_changes_nothing_outside_torchrun():
    assert not distributed.active()
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    idx = torch.arange(5)
    assert torch.equal(distributed.shard(idx), idx)
    assert distributed.from_main(lambda: 0.5) == 0.5
    assert not distributed.should_launch(1) and distributed.should_launch(2)


def test_the_params_key_is_validated_and_left_out_of_what_the_model_learns():
    assert FullParams().distributed.processes == 1 and AdvParams().distributed.backend == "auto"
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        FullParams(distributed={"processes": 0})
    with pytest.raises(ValueError, match="backend"):
        FullParams(distributed={"backend": "mpi"})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="nccl needs CUDA"):
            distributed.resolve_backend("nccl")
    assert distributed.resolve_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")


if __name__ == "__main__":  # one rank of _torchrun
    distributed.init_from_env("gloo")
    run_jobs(Path(sys.argv[1]), json.loads(sys.argv[2]))
