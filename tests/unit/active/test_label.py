"""`label suggest` and `label import` on a tiny workspace: the CSV, bad files rejected with a
reason, an import refused whole on an unknown class, a duplicate or a missing file, and the
model version registered after a new class names the data version that added it."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import draw_image, tiny_params, write_workspace
from transferlab.active.importer import import_labels
from transferlab.active.suggest import CSV_COLUMNS, LabelError, suggest
from transferlab.config import load_params
from transferlab.stages import STAGES

KINDS = ("circles", "squares", "stripes")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_dataset) -> Path:
    ws = write_workspace(tmp_path_factory.mktemp("label_ws"), tiny_params(tiny_dataset))
    params = load_params(ws / "params.yaml")
    for name in ("pull", "split", "features", "svm"):
        STAGES[name].run(params, ws)
    pool = ws / "unlabelled"
    pool.mkdir()
    for c, kind in enumerate(KINDS):
        for i in range(3):
            draw_image(kind, seed=5000 + 10 * c + i).save(pool / f"{kind}_{i}.png")
    (pool / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.new("RGB", (8, 8), (200, 30, 30)).save(pool / "tiny.png")  # below min_size 16
    return ws


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _write(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def _truth(path: str) -> str:
    return Path(path).name.rsplit("_", 1)[0]


@pytest.mark.parametrize("strategy", ["margin", "kcenter", "badge"])
def test_suggest_writes_the_csv_and_rejects_bad_files_with_a_reason(workspace, strategy, caplog):
    params = load_params(workspace / "params.yaml")
    out = Path(f"labels/{strategy}.csv")
    summary = suggest(params, workspace, budget=4, strategy=strategy, out=out)
    rows = _rows(workspace / out)
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert len(rows) == 4 == summary["suggested"]
    assert summary["pool"] == 9 and summary["rejected"] == 2
    assert {r["strategy"] for r in rows} == {strategy}
    assert {r["guess"] for r in rows} <= set(KINDS)
    assert all((workspace / out).parent.joinpath(r["thumbnail"]).is_file() for r in rows)
    assert "broken.png" not in {Path(r["path"]).name for r in rows}
    reasons = " ".join(caplog.messages)
    assert "broken.png" in reasons and "tiny.png" in reasons and "too small" in reasons


def test_second_suggest_extracts_nothing(workspace):
    params = load_params(workspace / "params.yaml")
    suggest(params, workspace, budget=2, out=Path("labels/a.csv"))
    again = suggest(params, workspace, budget=2, out=Path("labels/b.csv"))
    assert again["features_extracted"] == 0 and again["features_cached"] == 9


@pytest.mark.parametrize(
    ("bad", "messages"),
    [
        ({"label": "triangles"}, ["unknown class 'triangles'"]),
        ({"duplicate": True}, ["duplicate of row 2"]),
        ({"path": "unlabelled/gone.png"}, ["missing file"]),
        (  # all three at once: one error lists each
            {"label": "triangles", "duplicate": True, "path": "unlabelled/gone.png"},
            ["unknown class 'triangles'", "duplicate of row 2", "missing file"],
        ),
    ],
)
def test_import_refuses_the_whole_csv(workspace, bad, messages):
    params = load_params(workspace / "params.yaml")
    good = [{"path": str(workspace / "unlabelled" / f"{k}_0.png"), "label": k} for k in KINDS]
    rows = [dict(r) for r in good]
    if "label" in bad:
        rows[1]["label"] = bad["label"]
    if "path" in bad:
        rows[2]["path"] = str(workspace / bad["path"])
    if "duplicate" in bad:
        rows.append(dict(rows[0]))
    before = (
        sorted(p for p in (workspace / "labelled").rglob("*"))
        if (workspace / "labelled").exists()
        else []
    )
    with pytest.raises(LabelError) as info:
        import_labels(params, workspace, _write(workspace / "returned.csv", rows))
    assert all(m in str(info.value) for m in messages) and "nothing merged" in str(info.value)
    after = (
        sorted(p for p in (workspace / "labelled").rglob("*"))
        if (workspace / "labelled").exists()
        else []
    )
    assert after == before


def test_import_then_pull_merges_into_train_and_keeps_the_old_split(workspace):
    params = load_params(workspace / "params.yaml")
    suggest(params, workspace, budget=3, out=Path("labels/round.csv"))
    rows = _rows(workspace / "labels/round.csv")
    for r in rows:
        r["label"] = _truth(r["path"])
    _write(workspace / "labels/round_done.csv", rows)
    split_before = {r["path"]: r["split"] for r in _rows(workspace / "data/split.csv")}
    summary = import_labels(params, workspace, workspace / "labels/round_done.csv")
    assert summary["imported"] == 3 and summary["new_classes"] == []
    STAGES["pull"].run(params, workspace)
    STAGES["split"].run(params, workspace)
    split_after = {r["path"]: r["split"] for r in _rows(workspace / "data/split.csv")}
    added = {p: s for p, s in split_after.items() if p not in split_before}
    assert len(added) == 3 and set(added.values()) == {"train"}
    assert all("/labelled/" in p for p in added)
    assert {p: split_after[p] for p in split_before} == split_before
    # imported again: already in the data
    with pytest.raises(LabelError, match="already in the data"):
        import_labels(params, workspace, workspace / "labels/round_done.csv")


def test_unchanged_files_are_not_read_again_and_a_changed_one_is_judged_afresh(
    workspace, monkeypatch
):
    # pull's incremental rule: same size and mtime -> not read; anything else -> checked in full
    import os
    import pathlib

    params = load_params(workspace / "params.yaml")
    pool = workspace / "pool_memo"
    pool.mkdir()
    for i in range(3):
        draw_image("circles", seed=9100 + i).save(pool / f"c{i}.png")
        os.utime(pool / f"c{i}.png", ns=(1_600_000_000_000_000_000,) * 2)  # not racily new
    first = suggest(params, workspace, budget=2, source=Path("pool_memo"), out=Path("labels/m.csv"))
    assert first["pool"] == 3

    real_read = pathlib.Path.read_bytes
    reads: list[str] = []

    def counting_read(self):
        reads.append(self.name)
        return real_read(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", counting_read)
    suggest(params, workspace, budget=2, source=Path("pool_memo"), out=Path("labels/m.csv"))
    assert reads == []

    (pool / "c1.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken now")
    again = suggest(params, workspace, budget=2, source=Path("pool_memo"), out=Path("labels/m.csv"))
    assert reads == ["c1.png"]
    assert again["pool"] == 2 and again["rejected"] == 1


def _train_and_register(params, ws: Path) -> tuple[str, str]:
    """Data and svm stages, then one pipeline run with the svm's model: (version, dvc hash)."""
    from transferlab.classifiers import load_classifier
    from transferlab.data import manifest_hash
    from transferlab.data.version import data_version_tags
    from transferlab.layout import MANIFEST
    from transferlab.stages import STAGES
    from transferlab.tracking import MethodRecord, log_pipeline_run, registered_name

    for name in ("pull", "split", "features", "svm"):
        STAGES[name].run(params, ws)
    record = MethodRecord(
        name="svm",
        model=load_classifier(ws / "models/svm"),
        model_dir=ws / "models/svm",
        registered_name=registered_name(params, "svm"),
    )
    data = data_version_tags(ws)
    ids = log_pipeline_run(
        params,
        ws,
        tags={"data.manifest_hash": manifest_hash(ws / MANIFEST), **data},
        methods=[record],
        artifacts=[],
    )
    return ids["model_version.svm"], data["data.dvc_hash"]


@pytest.mark.slow
def test_new_class_version_is_tagged_with_the_data_version_that_added_it(workspace):
    # `label import --new-class`, the data and svm stages again, the pipeline run (what the
    # report stage logs): the new version predicts the class, carries the DVC hash of the data
    # that added it, and its lineage names the class as added
    from transferlab.tracking import get_model_version, model_lineage
    from transferlab.tracking.store import client

    ws = workspace
    params = load_params(ws / "params.yaml")
    v1, data1 = _train_and_register(params, ws)

    new = ws / "new"
    new.mkdir()
    returned = []
    for i in range(6):  # enough for the new class to get train and test images
        path = new / f"dots_{i}.png"
        draw_image("circles", seed=8800 + i, size=64).save(path)
        returned.append({"path": str(path), "label": "dots"})
    _write(ws / "returned_new.csv", returned)
    assert (
        import_labels(params, ws, ws / "returned_new.csv", new_classes=("dots",))["imported"] == 6
    )

    v2, data2 = _train_and_register(params, ws)
    assert int(v2) == int(v1) + 1 and data2 != data1

    new_lineage = model_lineage(params, ws, f"tiny-svm/{v2}")
    assert new_lineage["data"]["data.dvc_hash"] == data2
    assert new_lineage["data"]["classes_added"] == ["dots"]
    old_lineage = model_lineage(params, ws, f"tiny-svm/{v1}")
    assert old_lineage["data"]["data.dvc_hash"] == data1
    assert old_lineage["data"]["classes_added"] == []

    mv = get_model_version(client(params, ws), f"tiny-svm/{v2}")
    assert mv.tags["data.dvc_hash"] == data2  # on the version itself, not only on its run
    assert "dots" in mv.tags["model.classes"]
