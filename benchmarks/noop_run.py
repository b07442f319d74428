"""A cached no-op ``transferlab run`` against Prefect's own ephemeral start-up, in the same run.

    python benchmarks/noop_run.py [--repeats 2] [--images 6]

1. Builds a tiny workspace (3 generated classes, ``--images`` per class) and runs the whole
   pipeline once with ``transferlab run`` (the work; its time is printed, not compared).
2. Then, interleaved ``--repeats`` times:
   - ``transferlab run`` again: every stage is served from Prefect's result cache, and the flow
     skips the feature-shard and attack-batch pre-steps of cached stages;
   - the reference: a trivial Prefect flow (``@flow def f(): return 1``) in a fresh interpreter,
     same ``PREFECT_HOME``: Python, Prefect's import and its ephemeral server start-up.

Both are whole processes, timed from the outside. The ratio of the bests is the overhead a
no-op run adds over starting Prefect at all; goal: <= 1.5.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

TRIVIAL = "from prefect import flow\n@flow(name='trivial')\ndef f():\n    return 1\nf()\n"


def make_dataset(root: Path, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for c, colour in enumerate(((200, 30, 30), (30, 160, 40), (30, 40, 200))):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            arr = np.full((64, 64, 3), colour, dtype=np.int16) + rng.integers(-40, 40, (64, 64, 3))
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(
                root / f"class{c}" / f"{i}.png"
            )


def params(dataset: Path) -> dict:
    return {
        "data": {"source": {"kind": "folder", "path": str(dataset)}, "min_size": 16},
        "split": {"seed": 0, "val": 0.0, "test": 0.34},
        "features": {"backbone": "efficientnet_lite0", "pretrained": "package", "batch_size": 8},
        "svm": {"C": [0.1], "cv": 2},
        "top": {"epochs": 2},
        "full": {"epochs": 1, "image_size": 64, "batch_size": 8},
        "attack": {
            "models": ["svm"],
            "eps": ["0", "8/255"],
            "report_eps": "8/255",
            "max_images": 4,
            "grid_images": 1,
            "transfer": {"sources": []},
        },
        "tracking": {"experiment": "noop-bench"},
        "gate": {"eps": "8/255"},
    }


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return seconds


def _r(values: list[float]) -> list[float]:
    return [round(v, 2) for v in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--images", type=int, default=6, help="images per class")
    parser.add_argument("--dir", type=Path, help="reuse this folder of an earlier run")
    args = parser.parse_args()

    tmp = args.dir or Path(tempfile.mkdtemp(prefix="transferlab-noop-bench-"))
    ws = tmp / "ws"
    if not (ws / "params.yaml").is_file():
        make_dataset(tmp / "dataset", args.images)
        ws.mkdir()
        (ws / "params.yaml").write_text(yaml.safe_dump(params(tmp / "dataset"), sort_keys=False))
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TQDM_DISABLE": "1",
        # Prefect's default 20 s start-up wait is too short on a busy machine; both sides wait
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    cli = [str(Path(sys.executable).parent / "transferlab"), "run", "--quiet"]
    trivial = [sys.executable, "-c", TRIVIAL]

    first = timed(cli, ws, env)
    print(f"first transferlab run (all the work, unless --dir): {first:.1f} s")
    noop, ref = [], []
    for _ in range(args.repeats):
        ref.append(timed(trivial, ws, env))
        noop.append(timed(cli, ws, env))
    print(f"trivial Prefect flow (ephemeral start-up): best {min(ref):.2f} s of", _r(ref))
    print(f"no-op transferlab run:                     best {min(noop):.2f} s of", _r(noop))
    ratio = min(noop) / min(ref)
    verdict = "met" if ratio <= 1.5 else "missed"
    print(f"ratio no-op / Prefect start-up: {ratio:.2f} (goal <= 1.5: {verdict})")


if __name__ == "__main__":
    main()
