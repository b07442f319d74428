"""`make run > run.log 2>&1`: the log of a whole `transferlab run` written to a file is plain
text a person can read. No carriage returns or terminal escape codes (bar debris, colours), and
every line about a stage names it: Prefect's task lines carry the task in brackets, progress
lines start with the stage (or method) they belong to."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import tiny_params, write_workspace
from transferlab.stages import STAGES

pytestmark = pytest.mark.slow

# a tqdm-style line: "<desc>:  67% 16/24 [00:06<00:03, ...]"
PROGRESS = re.compile(r"^(?P<desc>.+?):\s+\d+% \d+/\d+ ")
# prefect.task_runs / prefect.flow_runs records as transferlab's log format writes them
PREFECT = re.compile(r"^\d\d:\d\d:\d\d \w+ prefect\.(task_runs|flow_runs)(?P<where>.*?): ")


@pytest.fixture(scope="module")
def run_log(tmp_path_factory, tiny_dataset) -> str:
    """One `transferlab run` of the smallest pipeline that still runs every stage, its stdout
    and stderr going to one file."""
    tmp = tmp_path_factory.mktemp("run_log")
    params = tiny_params(
        tiny_dataset,
        split={"per_class": 4},
        svm={"C": [0.1]},
        top={"epochs": 2, "search": {"lr": [0.1]}},
        full={"image_size": 32, "search": {"lr": [0.01]}},
        adv={"image_size": 32, "search": {"lr": [0.01]}},
        attack={"models": ["svm"], "eps": ["0", "2/255"], "max_images": 3},
    )
    ws = write_workspace(tmp / "ws", params)
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp / "prefect"),
        # a busy 2-core machine can take longer than Prefect's default 20 s to start its server
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        # every bar update a line: the most chances for debris
        "TRANSFERLAB_PROGRESS_INTERVAL": "0",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    log = tmp / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "transferlab.cli", "run"],
            cwd=ws,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=1800,
        )
    text = log.read_text(encoding="utf-8")
    assert proc.returncode == 0, text[-3000:]
    return text


def test_the_log_has_no_carriage_returns_or_escape_codes(run_log):
    assert "\r" not in run_log
    bad = [line for line in run_log.splitlines() if "\x1b" in line]
    assert bad == [], bad[:5]


def test_every_stage_line_names_its_stage(run_log):
    lines = run_log.splitlines()
    prefect = [line for line in lines if PREFECT.match(line)]
    # a record of each stage's task, each naming the task it is about
    for line in prefect:
        assert PREFECT.match(line)["where"].startswith(" ["), line
    finished = [line for line in prefect if "Finished in state" in line]
    for stage in STAGES:
        assert any(f"[{stage}]: Finished in state" in line for line in finished), stage
    progress = [m["desc"] for line in lines if (m := PROGRESS.match(line))]
    assert progress, "no progress line: TRANSFERLAB_PROGRESS_INTERVAL=0 writes each update"
    for desc in progress:
        assert desc.split()[0].rstrip(":") in STAGES, desc
