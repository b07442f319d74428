"""The HTML report opened in a real headless Chromium: every section renders, every image loads,
and the console stays clean."""

from __future__ import annotations

import pytest

from tests.integration.browser import chromium
from transferlab.html_report import SECTIONS

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


def test_report_renders_every_section_with_images_and_no_console_errors(
    browser, pipeline_workspace
):
    report = pipeline_workspace / "reports/index.html"
    browser.get(report.as_uri())
    for key, title in SECTIONS:
        section = browser.find_element("id", key)
        assert section.is_displayed(), key
        assert title in section.text
        assert len(section.text.strip()) > len(title), f"section {key} is empty"
    broken = browser.execute_script(
        "return Array.from(document.images)"
        ".filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt)"
    )
    assert broken == []
    n_images = browser.execute_script("return document.images.length")
    assert n_images >= 3 * 8 + 1  # thumbnails for 3 classes + the robustness plot
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    # the page is self-contained: no request leaves the file
    resources = browser.execute_script(
        "return performance.getEntriesByType('resource').map(r => r.name)"
    )
    assert [r for r in resources if not r.startswith(("data:", "file:"))] == []
    shot = pipeline_workspace / "reports/screenshot.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


def test_ladder_and_lineage_show_the_run(browser, pipeline_workspace):
    browser.get((pipeline_workspace / "reports/index.html").as_uri())
    ladder = browser.find_element("id", "ladder").text
    assert "svm" in ladder and "test_acc" in ladder
    lineage = browser.find_element("id", "lineage").text
    assert "git.commit" in lineage and "data.manifest_hash" in lineage
    assert "MLflow run: svm" in lineage
