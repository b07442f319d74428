"""Remake the MLflow screenshots of the README and docs/mlflow.md from a workspace that has run.

    python docs/screenshots.py WORKSPACE [--port 5077]

Starts `transferlab ui` on the workspace, opens the experiment page and the saved comparison
(robust accuracy against eps) in headless Chromium at 1,400 px, and writes
docs/mlflow-experiment.png and docs/mlflow-comparison.png.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
sys.path.insert(0, str(REPO))

from tests.integration.browser import chromium  # noqa: E402
from transferlab.config import load_params  # noqa: E402
from transferlab.report import series_key  # noqa: E402
from transferlab.tracking import comparison_url, experiment_url  # noqa: E402


def wait_for(driver, script: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if driver.execute_script(script):
            return
        time.sleep(1)
    driver.save_screenshot("/tmp/transferlab-shots-timeout.png")
    raise TimeoutError(f"{script} (the page: /tmp/transferlab-shots-timeout.png)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--port", type=int, default=5077)
    args = parser.parse_args()
    ws = args.workspace.resolve()
    params = load_params(ws / "params.yaml")
    ml = json.loads((ws / "reports/results.json").read_text())["mlflow"]
    base = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ui = subprocess.Popen(
        [sys.executable, "-P", "-m", "transferlab.cli", "ui", "--port", str(args.port)],
        cwd=ws,
        env=env,
    )
    driver = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{base}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(1)
        driver = chromium(Path("/tmp/transferlab-shots-profile"), width=1600, height=900)
        driver.get(experiment_url(base, ml["experiment_id"]))
        wait_for(driver, "return document.body.innerText.includes('svm+top+full')")
        # close the assistant panel (the runs table gets the width), open the parent run's
        # method runs
        driver.execute_script(
            "const b = Array.from(document.querySelectorAll('button'))"
            ".filter(b => (b.getAttribute('aria-label') || '').toLowerCase().includes('close'));"
            "if (b.length) b[b.length - 1].click();"
        )
        time.sleep(2)
        driver.execute_script(
            "const e = Array.from(document.querySelectorAll('[aria-label], [title]')).find("
            "b => /expand/i.test((b.getAttribute('aria-label') || '') + (b.title || '')));"
            "if (e) e.click();"
        )
        time.sleep(3)
        driver.save_screenshot(str(DOCS / "mlflow-experiment.png"))
        methods = [ml[m] for m in params.attack.models if m in ml]
        keys = [series_key(a) for a in params.attack.attacks]
        driver.get(comparison_url(base, ml["experiment_id"], methods, keys))
        wait_for(
            driver,
            "return document.querySelectorAll('.js-plotly-plot .scatterlayer path').length > 0",
        )
        time.sleep(3)
        driver.save_screenshot(str(DOCS / "mlflow-comparison.png"))
    finally:
        if driver is not None:
            driver.quit()
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=60)


if __name__ == "__main__":
    main()
