"""The README stays short and true: its stage table matches dvc.yaml, and every file it links or
shows exists."""

from __future__ import annotations

import re

import yaml

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def stage_rows() -> dict[str, str]:
    """stage name -> its 'writes' cell, from the README's table under '## The stages'."""
    table = README.split("## The stages", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and (m := re.fullmatch(r"`([a-z_-]+)`", cells[0])):
            rows[m.group(1)] = cells[2]
    return rows


def declared_outputs(stage: dict) -> list[str]:
    paths = []
    for key in ("outs", "metrics", "plots"):
        for entry in stage.get(key) or []:
            paths.append(entry if isinstance(entry, str) else next(iter(entry)))
    return paths


def test_stage_table_matches_dvc_yaml():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    rows = stage_rows()
    assert list(rows) == list(stages), "README stage table and dvc.yaml list different stages"
    for name, stage in stages.items():
        written = set(re.findall(r"`([^`]+)`", rows[name]))
        assert written == set(declared_outputs(stage)), name


def test_every_linked_file_exists():
    targets = re.findall(r"\]\(([^)#]+)\)", README)
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert local
    missing = [t for t in local if not (REPO / t).exists()]
    assert missing == []


def test_docs_link_back_and_to_existing_files():
    for doc in (REPO / "docs").glob("*.md"):
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if not target.startswith(("http://", "https://")):
                assert (doc.parent / target).exists(), (doc.name, target)


def test_readme_reads_in_five_minutes():
    # about 1,000 words at a reading pace of 200 a minute
    assert len(README.split()) <= 1000
