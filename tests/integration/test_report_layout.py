"""The HTML report in a 1,400-px-wide headless Chromium: no text box overlaps another, no figure
is shrunk or runs past the window, and the adversarial-example grid names every attacked model
and every attack. (The text inside each figure is checked in tests/unit/test_report_figures.py.)
"""

from __future__ import annotations

import pytest

from tests.integration.browser import OFFLINE, chromium
from transferlab.config import load_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Every rendered text node's boxes (one per line it wraps to), then the pairs from different
# nodes that share more than 1 px^2. Text nodes never nest, so any shared area is a collision.
TEXT_OVERLAPS = """
const boxes = [];
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
for (let node = walker.nextNode(); node; node = walker.nextNode()) {
  if (!node.textContent.trim()) continue;
  const range = document.createRange();
  range.selectNodeContents(node);
  for (const r of range.getClientRects()) {
    if (r.width > 0 && r.height > 0) boxes.push({text: node.textContent.trim().slice(0, 40), r});
  }
}
const hits = [];
for (let i = 0; i < boxes.length; i++) {
  for (let j = i + 1; j < boxes.length; j++) {
    const a = boxes[i].r, b = boxes[j].r;
    const w = Math.min(a.right, b.right) - Math.max(a.left, b.left);
    const h = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
    if (w > 1 && h > 1 && w * h > 1) hits.push([boxes[i].text, boxes[j].text]);
  }
}
return {count: boxes.length, hits: hits.slice(0, 10)};
"""

# Each figure (img.plot): natural and shown width, and its right edge in the window.
FIGURES = """
return Array.from(document.querySelectorAll('img.plot')).map(i => ({
  alt: i.alt, natural: i.naturalWidth, shown: i.getBoundingClientRect().width,
  right: i.getBoundingClientRect().right}));
"""


@pytest.fixture(scope="module")
def page(tmp_path_factory, pipeline_workspace):
    driver = chromium(tmp_path_factory.mktemp("chromium-layout"), *OFFLINE, width=1400)
    try:
        driver.get((pipeline_workspace / "reports/index.html").as_uri())
        yield driver
    finally:
        driver.quit()


def test_the_page_fits_1400_px_and_no_text_overlaps(page):
    width = page.execute_script("return window.innerWidth")
    assert 1300 <= width <= 1400  # the window, less any scrollbar
    assert page.execute_script("return document.documentElement.scrollWidth") <= width
    found = page.execute_script(TEXT_OVERLAPS)
    assert found["count"] > 50  # headings, tables, captions: the walk saw the page
    assert found["hits"] == [], f"text boxes overlap: {found['hits']}"


def test_every_figure_is_shown_at_its_own_size_inside_the_window(page):
    figures = page.execute_script(FIGURES)
    alts = {f["alt"] for f in figures}
    assert {"robustness", "adversarial_examples", "transfer"} <= alts, alts
    width = page.execute_script("return window.innerWidth")
    for fig in figures:
        # shrunk to fit, a figure's text would be smaller than the unit tests measured it
        assert fig["natural"] > 0 and fig["shown"] >= fig["natural"] - 1, fig
        assert fig["right"] <= width, fig


def test_the_examples_grid_names_every_model_and_attack(page, pipeline_workspace):
    attack = load_params(pipeline_workspace / "params.yaml").attack
    listed = page.find_element("css selector", "#examples .grid-rows").text
    rows = {tuple(part.strip() for part in row.split(" / ")) for row in listed.split(",")}
    assert {m for m, _ in rows} == set(attack.models), listed
    assert {a for _, a in rows} == set(attack.attacks), listed
