"""Remake the MLflow screenshots of the README and docs/mlflow.md from a workspace that has run.

    python docs/screenshots.py WORKSPACE [--port 5077]

Starts `transferlab ui` on the workspace, opens the experiment page (the last run's method runs
expanded, with clean accuracy, robust accuracy at the report eps and training seconds as columns,
as a user sets them in "Columns") and the saved comparison (robust accuracy against eps) in
headless Chromium at 1,600 px, and writes docs/mlflow-experiment.png and
docs/mlflow-comparison.png.
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
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
sys.path.insert(0, str(REPO))

from tests.integration.browser import chromium  # noqa: E402
from transferlab.config import load_params  # noqa: E402
from transferlab.report import series_key, summary_key  # noqa: E402
from transferlab.tracking import comparison_url, experiment_url  # noqa: E402


def wait_for(driver, script: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if driver.execute_script(script):
            return
        time.sleep(1)
    driver.save_screenshot("/tmp/transferlab-shots-timeout.png")
    raise TimeoutError(f"{script} (the page: /tmp/transferlab-shots-timeout.png)")


HIDDEN_COLUMNS = ("Dataset", "Source", "Models")


def shown_metrics(params) -> list[str]:
    """Clean accuracy, the last two attacks' robust accuracy at the report eps, training time."""
    eps = params.attack.report_eps
    robust = [summary_key(a, eps) for a in reversed(params.attack.attacks[-2:])]
    return ["test_acc", *robust, "train_seconds"]


# A column-selector entry whose title is exactly the name: click its checkbox.
CLICK_COLUMN = """
const [text] = arguments;
const node = Array.from(document.querySelectorAll(
  '[data-testid=column-selector-tree] .du-bois-light-tree-treenode'))
  .find(n => (n.querySelector('.du-bois-light-tree-title')?.innerText || '').trim() === text);
if (!node) return false;
node.querySelector('.du-bois-light-tree-checkbox').click();
return true;"""


def choose_columns(driver, hide: tuple[str, ...], show: list[str]) -> None:
    """Toggle columns in the runs table's "Columns" selector (searching for each by name)."""
    driver.execute_script(
        "Array.from(document.querySelectorAll('button'))"
        ".find(b => (b.innerText || '').trim() === 'Columns').click()"
    )
    time.sleep(2)
    box = driver.find_element(By.CSS_SELECTOR, "input[placeholder='Search columns']")
    for name in (*hide, *show):
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE)
        box.send_keys(name)
        time.sleep(1.5)
        if not driver.execute_script(CLICK_COLUMN, name):
            print(f"no column {name!r} in the MLflow UI's selector", file=sys.stderr)
    box.send_keys(Keys.ESCAPE)
    time.sleep(1)


def widen(driver, column: str, dx: int) -> None:
    """Drag a runs-table column's right edge by ``dx`` pixels (names are cut at 100 px)."""
    edges = driver.find_elements(
        By.CSS_SELECTOR, f".ag-header-cell[col-id*='{column}'] .ag-header-cell-resize"
    )
    if edges:
        chain = ActionChains(driver).click_and_hold(edges[0])
        chain.move_by_offset(dx // 2, 0).move_by_offset(dx - dx // 2, 0).release().perform()
        time.sleep(1)


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
        # close the assistant panel (the runs table gets the width), show the per-method
        # columns that answer "which method, how robust", open the last parent run's method runs
        driver.execute_script(
            "document.querySelectorAll('button').forEach(b => "
            "(b.getAttribute('aria-label') || '').toLowerCase() === 'close' && b.click());"
        )
        time.sleep(1)
        choose_columns(driver, hide=HIDDEN_COLUMNS, show=shown_metrics(params))
        driver.execute_script(
            "const b = document.querySelector('button[data-component-id*=runnamecellrenderer]');"
            "if (b) b.click();"
        )
        time.sleep(3)
        # widen from the right, so each drag stays inside the window
        for column, dx in [*((m, 90) for m in reversed(shown_metrics(params))), ("Run Name", 170)]:
            widen(driver, column, dx)
        ActionChains(driver).move_to_element(driver.find_element(By.TAG_NAME, "h2")).perform()
        time.sleep(2)
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
