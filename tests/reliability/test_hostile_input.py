"""Hostile input, one row per class: each row feeds two or more probes of its class and checks
the outcome every time: a clear message, the exit code, nothing written outside the workspace,
nothing executed, nothing lost (issue 18, data side)."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import yaml

from tests.conftest import draw_image, tiny_params, write_workspace
from tests.reliability.cases import Case
from tests.reliability.conftest import cli, error_lines, wait_for
from transferlab.config import load_params
from transferlab.data import read_manifest
from transferlab.data.pull import dataset_problem
from transferlab.names import metric_key
from transferlab.stages import STAGES

# Where a name or a link from data could try to write (absolute paths in keys, .. escapes).
CANARIES = (Path("/abs/path/evil.png"), Path("/tmp/evil.png"), Path("PWNED"))


def _snapshot(root: Path, skip: Path | None = None) -> dict[str, object]:
    """Every entry under ``root`` (links as their target, files by size, mtime and small
    content), leaving out ``skip`` and the params file the probes edit; never follows a link or
    reads a huge file."""
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        if (skip is not None and p.is_relative_to(skip)) or p.name == "params.yaml":
            continue
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_file():
            st = p.stat()
            small = st.st_size < 1 << 20
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if small else None
            out[rel] = (st.st_size, st.st_mtime_ns, digest)
        else:
            out[rel] = "dir" if p.is_dir() else "other"
    return out


class Guard:
    """Checks that a probe wrote nothing outside its workspace and executed nothing."""

    def __init__(self, tmp_path: Path, ws: Path) -> None:
        self.tmp_path, self.ws = tmp_path, ws
        self.before = _snapshot(tmp_path, skip=ws)
        self.cwd = _snapshot(Path.cwd(), skip=Path.cwd() / ".pytest_cache")

    def check(self) -> None:
        assert _snapshot(self.tmp_path, skip=self.ws) == self.before, "wrote outside the workspace"
        for canary in CANARIES:
            assert not canary.exists(), f"{canary} was created"
        assert not list(self.tmp_path.rglob("PWNED")), "a name from data was executed"


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_image("circles", seed=seed, size=48).save(path)


def _source(root: Path, classes=("circles", "squares"), n=4) -> Path:
    for k, name in enumerate(classes):
        for i in range(n):
            _png(root / name / f"{i}.png", seed=50 * k + i)
    return root


@pytest.fixture(scope="module")
def pulled(tmp_path_factory, tiny_dataset) -> Path:
    """A workspace with the tiny dataset pulled: what a failed probe must leave whole."""
    ws = write_workspace(tmp_path_factory.mktemp("pulled") / "ws", tiny_params(tiny_dataset))
    STAGES["pull"].run(load_params(ws / "params.yaml"), ws)
    return ws


@pytest.fixture
def ws(pulled, tmp_path) -> Path:
    dest = tmp_path / "ws"
    shutil.copytree(pulled, dest)
    return dest


def _with(params_file: Path, edit) -> None:
    params = yaml.safe_load(params_file.read_text())
    edit(params)
    params_file.write_text(yaml.safe_dump(params))


def _limit_memory():
    # The unbounded loader grew to 3.1 GB on a 1 KB file; the bounded one needs a fraction.
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


# ------------------------------------------------------------------ params


def _set(section, key, value):
    def edit(p):
        p.setdefault(section, {})[key] = value

    return edit


def _source_edit(**values):
    def edit(p):
        p["data"]["source"] = {**p["data"]["source"], **values}

    return edit


VALUE_PROBES = [
    (_set("split", "val", 0.8), "split: split.val + split.test = 1.05"),
    (_set("split", "seed", -1), "split.seed"),
    (_set("svm", "C", [float("inf")]), "svm.C.0: Input should be a finite number"),
    (_set("full", "epochs", 10**15), "full.epochs"),
    (_source_edit(kind="tuxpaint_photos", classes={}), "data.source.classes"),
    (_source_edit(kind="idx", classes=["..", "b"]), "'..' would leave its folder"),
]


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "hostile-params-values",
            "split fractions summing to 1.05, seed -1, C .inf, 10**15 epochs, no classes, a class "
            "named '..'",
            "exit 2 at once, one line naming params.yaml, the key and what is allowed",
            "data/ as pulled; nothing written outside the workspace",
        ).param()
    ],
)
def test_hostile_param_values(case, ws, tmp_path):
    guard = Guard(tmp_path, ws)
    before = _snapshot(ws, skip=ws / ".transferlab")
    original = (ws / "params.yaml").read_text()
    for edit, expected in VALUE_PROBES:
        (ws / "params.yaml").write_text(original)
        _with(ws / "params.yaml", edit)
        proc = cli("pull", cwd=ws, timeout=120)
        assert proc.returncode == 2, (expected, proc.stderr)
        (line,) = error_lines(proc.stderr)
        assert "params.yaml" in line and expected in line, line
    (ws / "params.yaml").write_text(original)
    assert _snapshot(ws, skip=ws / ".transferlab") == before
    guard.check()


def _laughs() -> str:
    text = "a: &a ['lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol']\n"
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        text += f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]\n"
    return text + "split: {seed: *i}\n"


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "hostile-params-yaml",
            "a 1 KB billion-laughs params file, a self-referencing alias, a 2 MB params file, "
            "a params file that is not UTF-8, a python/object tag that would run a command",
            "exit 2 in small memory, one short line (no 522 MB error line)",
            "data/ as pulled; nothing written outside the workspace",
        ).param()
    ],
)
def test_hostile_yaml(case, ws, tmp_path):
    guard = Guard(tmp_path, ws)
    before = _snapshot(ws, skip=ws / ".transferlab")
    probes = [
        (_laughs().encode(), "expands to more than"),
        (b"a: &a [*a]\nsplit: {seed: 0}\n", "self-reference"),
        (b"# padding\n" * 200_000, "too large for a params file"),
        (b"split: {seed: 0}\n# caf\xe9\n", "not UTF-8"),
        (b"split: !!python/object/apply:os.system ['touch PWNED']\n", "invalid YAML"),
    ]
    for text, expected in probes:
        (ws / "params.yaml").write_bytes(text)
        proc = subprocess.run(
            [sys.executable, "-m", "transferlab.cli", "split"],
            cwd=ws,
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=_limit_memory,
        )
        assert proc.returncode == 2, (expected, proc.stderr[-2000:])
        (line,) = error_lines(proc.stderr)
        assert expected in line and len(proc.stderr) < 2000, line
    assert _snapshot(ws, skip=ws / ".transferlab") == before
    guard.check()


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "hostile-secrets-in-urls",
            "user:pass in data.source.endpoint_url, in an HTTP source URL, in tracking_uri; a "
            "token in a signed URL",
            "exit 2 saying to use the environment or AWS config; the secret is printed nowhere",
            "no file of the workspace holds the secret (no dvc.lock, no MLflow store)",
        ).param()
    ],
)
def test_secrets_in_urls(case, ws, tmp_path):
    guard = Guard(tmp_path, ws)
    sha = "a" * 64
    probes = [
        (
            _source_edit(kind="s3", url="s3://b/p", endpoint_url="http://AKIAX:s3cr3t@h:9/"),
            "s3cr3t",
        ),
        (_source_edit(kind="http", url="https://me:hunter2@h/a.tgz", sha256=sha), "hunter2"),
        (_set("tracking", "tracking_uri", "postgresql://u:pgpass@db/mlflow"), "pgpass"),
        (_source_edit(kind="http", url="https://h/a.tgz?X-Amz-Signature=sig0", sha256=sha), "sig0"),
    ]
    original = (ws / "params.yaml").read_text()
    for edit, secret in probes:
        (ws / "params.yaml").write_text(original)
        _with(ws / "params.yaml", edit)
        proc = cli("pull", cwd=ws, timeout=120)
        assert proc.returncode == 2, proc.stderr
        (line,) = error_lines(proc.stderr)
        assert "environment" in line and "AWS_" in line, line
        assert secret not in proc.stderr + proc.stdout
        for p in ws.rglob("*"):
            if p.is_file() and p.name != "params.yaml":
                assert secret.encode() not in p.read_bytes(), p
    assert not (ws / "dvc.lock").exists()
    guard.check()


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "hostile-markup-in-paths",
            "data.source.path '/…/[train]' and '/…/[red]x[/red]' (missing folders)",
            "exit 1, the error line shows the path with its brackets",
            "data/ as pulled",
        ).param()
    ],
)
def test_brackets_in_error_lines_survive(case, ws, tmp_path):
    guard = Guard(tmp_path, ws)
    original = (ws / "params.yaml").read_text()
    for name in ("[train]", "[red]x[/red]", "[bold]"):
        (ws / "params.yaml").write_text(original)
        _with(ws / "params.yaml", _source_edit(path=str(tmp_path / name)))
        proc = cli("pull", cwd=ws, timeout=120)
        assert proc.returncode == 1, proc.stderr
        (line,) = error_lines(proc.stderr)
        assert f"{tmp_path / name}" in line, line
    assert dataset_problem(ws / "data") is None
    guard.check()


# ------------------------------------------------------------------ data


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "hostile-data-names",
            "class folders named with an emoji, an apostrophe, '&', '(' and '$(touch PWNED)', "
            "an NFD folder name; manifest label '..' and path '../x.png'",
            "pull keeps the odd names as NFC labels whose MLflow keys are valid; the manifest "
            "probes exit 1 naming the entry",
            "nothing written outside the workspace, nothing executed",
        ).param()
    ],
)
def test_names_from_data(case, tmp_path):
    from mlflow.utils.validation import _validate_metric_name

    odd = ("cat's 🐱", "A&B (1)", "$(touch PWNED)", unicodedata.normalize("NFD", "café"))
    src = _source(tmp_path / "src", classes=odd)
    ws = write_workspace(tmp_path / "ws", tiny_params(src))
    guard = Guard(tmp_path, ws)
    proc = cli("pull", cwd=ws, timeout=180)
    assert proc.returncode == 0, proc.stderr
    manifest_labels = {r["label"] for r in read_manifest(ws / "data/manifest.csv")}
    assert manifest_labels == {unicodedata.normalize("NFC", label) for label in odd}
    assert "café" in manifest_labels and (ws / "data/images/café").is_dir()
    for label in manifest_labels:
        _validate_metric_name(metric_key(f"test_acc_class_{label}"))
    guard.check()
    for bad, expected in (("x.png,..", "label '..'"), ("../x.png,cats", "path '../x.png'")):
        (src / "m.csv").write_text(f"path,label\n{bad}\n")
        _with(ws / "params.yaml", _source_edit(kind="manifest", path=str(src / "m.csv")))
        guard = Guard(tmp_path, ws)
        before = _snapshot(ws / "data")
        proc = cli("pull", cwd=ws, timeout=120)
        assert proc.returncode == 1, proc.stderr
        (line,) = error_lines(proc.stderr)
        assert "entry 1" in line and expected in line, line
        assert _snapshot(ws / "data") == before
    guard.check()


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "hostile-data-files",
            "x.png -> /dev/zero, a link to a file and a class folder outside the source, an "
            "8 GB sparse x.jpg, a FIFO named .png",
            "exit 0: each is one rejection with its reason in rejected.json, the rest kept",
            "every good image; nothing read or written outside the source and workspace",
        ).param()
    ],
)
def test_files_that_would_hurt(case, tmp_path):
    src = _source(tmp_path / "src")
    _source(tmp_path / "outside", classes=("secret",))
    os.symlink("/dev/zero", src / "circles" / "zero.png")
    os.symlink(tmp_path / "outside" / "secret" / "0.png", src / "circles" / "leak.png")
    os.symlink(tmp_path / "outside" / "secret", src / "linked")
    with open(src / "squares" / "huge.jpg", "wb") as f:
        f.truncate(8 << 30)
    os.mkfifo(src / "squares" / "fifo.png")
    ws = write_workspace(tmp_path / "ws", tiny_params(src))
    guard = Guard(tmp_path, ws)
    proc = cli("pull", cwd=ws, timeout=180)
    assert proc.returncode == 0, proc.stderr
    rejected = {
        r["source"].rsplit("/", 1)[-1]: r["reason"]
        for r in json.loads((ws / "data/rejected.json").read_text())
    }
    assert rejected["zero.png"].startswith("symlink out of the source folder")
    assert rejected["leak.png"].startswith("symlink out of the source folder")
    assert rejected["linked"].startswith("symlink out of the source folder")
    assert rejected["huge.jpg"].startswith("too large")
    assert rejected["fifo.png"].startswith("not a regular file")
    assert "secret" not in (ws / "data/manifest.csv").read_text()
    assert dataset_problem(ws / "data") is None
    assert len((ws / "data/manifest.csv").read_text().splitlines()) == 1 + 8
    guard.check()


# ------------------------------------------------------------------ pull state


def _copies_not_listed(data: Path) -> bool:
    """Whether data/images holds a file its manifest does not list (an unfinished pull's)."""
    try:
        listed = {row["path"] for row in read_manifest(data / "manifest.csv")}
    except OSError:
        return False
    return any(
        p.relative_to(data).as_posix() not in listed
        for p in (data / "images").rglob("*")
        if p.is_file()
    )


@pytest.mark.parametrize(
    ("case", "when"),
    [
        Case(
            f"pull-killed-leftovers[{when}]",
            f"pull killed with SIGKILL {what}; a .pull-* folder whose owner died",
            "the next pull removes them and completes (exit 0)",
            "the dataset, whole; a live pull's folder",
        ).param(when)
        for when, what in (
            ("first-pull", "while building the first dataset"),
            ("adding-files", "while copying new files into data/images"),
        )
    ],
)
def test_killed_pulls_leave_nothing_that_lasts(case, when, tmp_path):
    src = _source(tmp_path / "src", n=150)
    ws = write_workspace(tmp_path / "ws", tiny_params(src))
    if when == "adding-files":
        assert cli("pull", cwd=ws, timeout=300).returncode == 0
        for k, name in enumerate(("circles", "squares")):
            for i in range(150, 450):
                _png(src / name / f"{i}.png", seed=50 * k + i)
    guard = Guard(tmp_path, ws)
    proc = subprocess.Popen(
        [sys.executable, "-m", "transferlab.cli", "pull"],
        cwd=ws,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if when == "adding-files":  # new copies go straight into images/, before the manifest
        wait_for(lambda: _copies_not_listed(ws / "data") or proc.poll() is not None)
    else:
        wait_for(lambda: list((ws / "data").glob(".pull-*")) or proc.poll() is not None)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (ws / "data" / ".pull-dead").mkdir(parents=True, exist_ok=True)
    (ws / "data" / ".pull-dead" / "owner.json").write_text(
        json.dumps({"pid": dead.pid, "host": os.uname().nodename})
    )
    assert list((ws / "data").glob(".pull-*"))
    done = cli("pull", cwd=ws, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not list((ws / "data").glob(".pull-*"))
    assert dataset_problem(ws / "data") is None
    # every source file is in the manifest or rejected (as a duplicate: the seeds overlap)
    rejected = json.loads((ws / "data/rejected.json").read_text())
    assert {r["reason"].split(":")[0] for r in rejected} <= {"duplicate"}
    n_listed = len(read_manifest(ws / "data/manifest.csv"))
    assert n_listed + len(rejected) == len(list(src.rglob("*.png")))
    guard.check()


@pytest.mark.parametrize(
    "case",
    [
        Case(
            "pull-damaged-outputs",
            "an image deleted from data/images; an image overwritten with other bytes of the "
            "same size",
            "the cached Prefect pull is not trusted (outputs_present is False); the next pull "
            "restores the exact bytes",
            "every image, with the sha256 the manifest records",
        ).param()
    ],
)
def test_damaged_pull_outputs_are_rebuilt(case, ws, tmp_path):
    from transferlab_flows.tasks.stages import outputs_present

    guard = Guard(tmp_path, ws)
    images = sorted((ws / "data/images").rglob("*.png"))
    deleted, overwritten = images[0], images[-1]
    deleted.unlink()
    size = overwritten.stat().st_size
    overwritten.unlink()
    overwritten.write_bytes(b"\0" * size)
    assert not outputs_present("pull", ws)
    assert "missing" in dataset_problem(ws / "data")
    STAGES["pull"].run(load_params(ws / "params.yaml"), ws)
    assert outputs_present("pull", ws)
    for row in read_manifest(ws / "data/manifest.csv"):
        assert hashlib.sha256((ws / "data" / row["path"]).read_bytes()).hexdigest() == row["sha256"]
    guard.check()
