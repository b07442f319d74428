"""A no-op ``dvc repro`` against DVC's own start-up (``dvc version``), in the same run.

    python benchmarks/dvc_noop.py REPO [--repeats 5]

REPO is a DVC workspace where ``dvc repro`` has run (a clone with the tiny params of
tests/integration/test_dvc_clone.py, or this checkout after ``make run`` and ``dvc repro``).
Interleaved ``--repeats`` times, each a whole process timed from outside: ``dvc repro`` (must
run no stage), ``dvc status dvc.yaml`` and ``dvc version``. Prints the median wall time and CPU
time (user + sys of the process) of each, and the ratios against ``dvc version``.

Goal (docs/dvc.md): a no-op ``dvc repro`` takes <= 2 s on an idle machine. On a shared machine
wall time grows with the load; the CPU seconds and the ratio to ``dvc version`` do not.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "repro (no-op)": ["dvc", "repro"],
    "status dvc.yaml": ["dvc", "status", "dvc.yaml"],
    "version": ["dvc", "version"],
}


def timed(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, output) of one process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout + proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("repo", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    timed(COMMANDS["repro (no-op)"], args.repo)  # warm the state database and the OS caches
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, cmd in COMMANDS.items():
            wall, cpu, out = timed(cmd, args.repo)
            if name.startswith("repro") and "Running stage" in out:
                sys.exit(f"dvc repro ran a stage in {args.repo}: not a no-op\n{out[-2000:]}")
            runs[name].append((wall, cpu))
    median = {
        name: (statistics.median(w for w, _ in r), statistics.median(c for _, c in r))
        for name, r in runs.items()
    }
    load = os.getloadavg()[0]
    print(f"{args.repo}: {args.repeats} interleaved runs, load average {load:.1f}")
    print(f"{'':18} {'wall s':>7} {'cpu s':>7} {'wall/version':>13} {'cpu/version':>12}")
    ref_wall, ref_cpu = median["version"]
    for name, (wall, cpu) in median.items():
        print(f"{name:18} {wall:7.2f} {cpu:7.2f} {wall / ref_wall:13.2f} {cpu / ref_cpu:12.2f}")


if __name__ == "__main__":
    main()
