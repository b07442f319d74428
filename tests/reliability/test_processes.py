"""Processes and locks: the temporary Prefect server dies with its parent and tolerates a busy
machine, abandoned flow runs are closed, and DVC's writers respect a running transferlab."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_params, write_workspace
from tests.reliability.cases import Case
from tests.reliability.conftest import cli, error_lines, tree_digest, wait_for

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose: it holds no port and runs nothing
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _servers_of(prefect_home: str) -> list[int]:
    """Temporary Prefect servers running with this PREFECT_HOME."""
    out = subprocess.run(
        ["pgrep", "-f", "transferlab_flows.ephemeral"], capture_output=True, text=True
    ).stdout
    found = []
    for pid in map(int, out.split()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PREFECT_HOME={prefect_home}".encode() in environ and _alive(pid):
            found.append(pid)
    return found


_HOLDS_SERVER = textwrap.dedent(
    """
    import sys, time
    from transferlab_flows.ephemeral import prefect_api
    if sys.argv[1] == "serving":
        with prefect_api(timeout=240) as url:
            print(url, flush=True)
            time.sleep(600)
    else:  # killed while the server is still starting
        with prefect_api(timeout=600):
            pass
    """
)


@pytest.mark.parametrize(
    ("case", "when"),
    [
        Case(
            f"server-dies-with-parent[{when}]",
            f"kill -9 on the process that started the temporary Prefect server ({when})",
            "the server exits too (no orphan adopted by PID 1)",
            "nothing left running, the port freed",
        ).param(when)
        for when in ("serving", "starting")
    ],
)
def test_temporary_prefect_server_dies_with_its_parent(case, when, tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    parent = subprocess.Popen(
        [sys.executable, "-c", _HOLDS_SERVER, when],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if when == "serving":
            url = parent.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:"), url
        wait_for(lambda: _children(parent.pid), timeout=120)
        (server,) = _children(parent.pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        wait_for(lambda: not _alive(server), timeout=30)
    finally:
        parent.kill()
        parent.wait()


@pytest.mark.parametrize(
    ("case", "probe"),
    [
        Case(
            f"busy-machine-prefect-start[{probe}]",
            f"the temporary Prefect server cannot start in time ({probe})",
            "one line naming the setting and the `dvc repro` / `transferlab <stage>` path",
            "no server left running, no stage started",
        ).param(probe)
        for probe in ("library", "transferlab-run")
    ],
)
def test_slow_prefect_start_fails_clearly(case, probe, tmp_path, tiny_dataset):
    # a 1 s budget: the real server needs several seconds, as on a machine busy with other work
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1",
    }
    env.pop("PREFECT_API_URL", None)
    if probe == "library":
        code = textwrap.dedent(
            """
            import os
            from transferlab_flows.ephemeral import prefect_api, ServerStartFailed
            try:
                with prefect_api():
                    raise SystemExit("started")
            except ServerStartFailed as exc:
                print(exc)
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**env, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        message = out.stdout
    else:
        ws = write_workspace(tmp_path / "ws", tiny_params(tiny_dataset))
        out = cli("run", cwd=ws, env=env, timeout=180)
        assert out.returncode == 1, out.stderr[-2000:]
        (message,) = error_lines(out.stderr)
        assert sorted(p.name for p in ws.iterdir()) == ["params.yaml"]  # no stage started
    assert "did not answer within 1 s" in message
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in message
    assert "dvc repro" in message and "transferlab pull" in message
    assert _servers_of(env["PREFECT_HOME"]) == []  # no server of this test still running


_MARK = textwrap.dedent(
    """
    import json, sys
    from prefect import get_client
    from prefect.states import Running
    from transferlab_flows.ephemeral import prefect_api
    from transferlab_flows.pipeline import mark_abandoned_runs, pipeline

    here, elsewhere = sys.argv[1], sys.argv[2]
    with prefect_api(timeout=240):
        with get_client(sync_client=True) as client:
            ids = {}
            for name, workdir in (("here", here), ("elsewhere", elsewhere)):
                run = client.create_flow_run(pipeline, parameters={"workdir": workdir})
                client.set_flow_run_state(run.id, Running(), force=True)
                ids[name] = str(run.id)
            marked = mark_abandoned_runs(here)
            states = {k: client.read_flow_run(v).state.type.value for k, v in ids.items()}
        print(json.dumps({"ids": ids, "marked": marked, "states": states}))
    """
)


# Serves the Prefect API (so it outlives the killed flow's process), then, once told the flow's
# process is dead, does what the next run in that workspace does and reports the run states.
_SERVE_THEN_MARK = textwrap.dedent(
    """
    import json, sys
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState
    from prefect.client.schemas.filters import FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from transferlab_flows.ephemeral import prefect_api
    from transferlab_flows.pipeline import mark_abandoned_runs

    here = sys.argv[1]
    with prefect_api(timeout=240) as url:
        print(url, flush=True)
        sys.stdin.readline()
        with get_client(sync_client=True) as client:
            running = FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
            )
            left = [str(r.id) for r in client.read_flow_runs(flow_run_filter=running)]
            marked = mark_abandoned_runs(here)
            states = {i: client.read_flow_run(i).state.type.value for i in left}
        print(json.dumps({"left": left, "marked": marked, "states": states}), flush=True)
    """
)


_FLOW_ON_GIVEN_API = textwrap.dedent(
    """
    import sys
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from transferlab_flows.pipeline import pipeline

    url = sys.stdin.readline().strip()
    with temporary_settings({PREFECT_API_URL: url}):
        pipeline(params_path="params.yaml", workdir=sys.argv[1])
    """
)


def _killed_mid_pull(here: Path, env: dict, tiny_dataset: Path) -> dict:
    """A real `transferlab run` flow killed with SIGKILL while its pull task waits on an HTTP
    server that never answers; then the next run's marking, against the same Prefect server."""
    import json
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(1)
    source = {
        "kind": "http",
        "url": f"http://127.0.0.1:{listener.getsockname()[1]}/photos.tar.gz",
        "sha256": "0" * 64,
        "path": str(here / "downloads"),
        "retries": 0,
        "timeout": 600,
    }
    write_workspace(here, tiny_params(tiny_dataset, data={"source": source, "min_size": 16}))
    # the flow's process imports while the server starts, then runs against it
    log = here / "flow.log"
    flow = subprocess.Popen(
        [sys.executable, "-c", _FLOW_ON_GIVEN_API, str(here)],
        cwd=here,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),  # noqa: SIM115 - the child owns it
        text=True,
    )
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVE_THEN_MARK, str(here.resolve())],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        flow.stdin.write(url + "\n")
        flow.stdin.flush()
        conn = None
        while conn is None:  # the pull task connects: the flow run is RUNNING
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                assert flow.poll() is None, f"the flow ended first:\n{log.read_text()[-3000:]}"
        flow.send_signal(signal.SIGKILL)
        flow.wait()
        conn.close()
        out, _ = server.communicate("dead\n", timeout=120)
        assert server.returncode == 0
        return json.loads(out.strip().splitlines()[-1])
    finally:
        listener.close()
        for proc in (flow, server):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize(
    ("case", "probe"),
    [
        Case(
            f"abandoned-flow-run[{probe}]",
            f"a pipeline flow run left RUNNING by a killed `transferlab run` ({what})",
            "the next run in that workspace marks it CRASHED; runs of other workspaces stay",
            "other workspaces' runs",
        ).param(probe)
        for probe, what in (
            ("left-running", "its state set RUNNING, beside one of another workspace"),
            ("kill-9-mid-pull", "SIGKILL while its pull task downloads"),
        )
    ],
)
def test_abandoned_flow_runs_are_marked_crashed(case, probe, tmp_path, tiny_dataset):
    import json

    here, elsewhere = tmp_path / "ws", tmp_path / "other"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    if probe == "kill-9-mid-pull":
        result = _killed_mid_pull(here, env, tiny_dataset)
        (killed,) = result["left"]  # the flow's own run, never finished
        assert result["marked"] == [killed]
        assert result["states"] == {killed: "CRASHED"}
        return
    out = subprocess.run(
        [sys.executable, "-c", _MARK, str(here), str(elsewhere)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["marked"] == [result["ids"]["here"]]
    assert result["states"] == {"here": "CRASHED", "elsewhere": "RUNNING"}


# ------------------------------------------------------------------ DVC's writers

_HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from transferlab.workspace import workspace_lock
    with workspace_lock(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(600)
    """
)


@pytest.fixture
def dvc_repo(tmp_path) -> Path:
    """A DVC repository whose one stage writes models/svm/ (a stand-in command: what is tested
    is DVC's behaviour around it), reproduced once."""
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}

    def sh(*args):
        subprocess.run(args, cwd=repo, check=True, capture_output=True, env=env)

    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    sh("dvc", "config", "core.site_cache_dir", str(repo / ".dvc" / "site_cache"))
    (repo / "params.yaml").write_text("svm:\n  C: 1\n")
    (repo / "dvc.yaml").write_text(
        textwrap.dedent(
            """
            stages:
              svm:
                cmd: mkdir -p models/svm && echo "C=${svm.C}" > models/svm/head.pt
                params: [svm]
                outs: [models/svm]
            """
        )
    )
    sh("dvc", "repro")
    return repo


@pytest.mark.parametrize(
    ("case", "command"),
    [
        Case(
            f"dvc-waits-for-transferlab[{' '.join(command)}]",
            f"`{' '.join(command)}` while a transferlab run holds the workspace",
            "DVC stops with its lock error and writes nothing; the same command works after",
            "models/ exactly as the running stage left them",
        ).param(command)
        for command in (("dvc", "repro", "svm"), ("dvc", "checkout", "--force"))
    ],
)
def test_dvc_does_not_rewrite_outputs_under_a_running_transferlab(case, command, dvc_repo):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    # what DVC would restore: the run cache has C=1; the running stage wrote C=2 meanwhile
    (dvc_repo / "params.yaml").write_text("svm:\n  C: 2\n")
    subprocess.run(["dvc", "repro"], cwd=dvc_repo, check=True, capture_output=True, env=env)
    (dvc_repo / "params.yaml").write_text("svm:\n  C: 1\n")
    (dvc_repo / "models/svm/head.pt").write_text("being written by transferlab\n")
    before = tree_digest(dvc_repo / "models")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(dvc_repo)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        out = subprocess.run(command, cwd=dvc_repo, capture_output=True, text=True, env=env)
        assert out.returncode != 0
        assert "Unable to acquire lock" in out.stderr + out.stdout
        assert tree_digest(dvc_repo / "models") == before
    finally:
        holder.kill()
        holder.wait()
    out = subprocess.run(command, cwd=dvc_repo, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert tree_digest(dvc_repo / "models") != before  # DVC would have rewritten it


def test_a_stage_that_dvc_runs_takes_the_lock_dvc_released(dvc_repo):
    """DVC unlocks its repository while a stage's command runs, so the stage command's own
    workspace lock (which includes DVC's) does not deadlock `dvc repro`."""
    (dvc_repo / "dvc.yaml").write_text(
        textwrap.dedent(
            f"""
            stages:
              svm:
                cmd: {sys.executable} -c "import pathlib; from transferlab.workspace import
                  workspace_lock; lock = workspace_lock(pathlib.Path('.')); lock.__enter__();
                  pathlib.Path('models/svm').mkdir(parents=True, exist_ok=True);
                  pathlib.Path('models/svm/head.pt').write_text('ok')"
                outs: [models/svm]
            """
        )
    )
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(["dvc", "repro"], cwd=dvc_repo, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert (dvc_repo / "models/svm/head.pt").read_text() == "ok"
