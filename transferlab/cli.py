"""``transferlab <stage>``: what ``dvc.yaml`` runs, and ``transferlab run``: the whole Prefect flow.

Exit codes: 0 success, 1 a stage failed (bad data, unreachable server...), 2 bad params or usage.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.table import Table

from transferlab.config import DEFAULT_PARAMS, ParamsError, load_params

app = typer.Typer(
    help=(
        "Adapt an ImageNet CNN to your images (linear SVM on deep features, ...) and measure "
        "how easily it is fooled by adversarial examples.\n\n"
        "Every command reads params.yaml (or --params PATH). Typical use:\n\n"
        "  transferlab run            # the whole pipeline as a Prefect flow\n\n"
        "  dvc repro                  # the same stages, one process each, via dvc.yaml\n\n"
        "  transferlab features       # one stage"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)
out = Console()

ParamsOpt = Annotated[
    Path, typer.Option("--params", "-p", help="params file to read", show_default=True)
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="debug logs and tracebacks")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="warnings and errors only")]

_verbose = False


def _setup(params_path: Path, verbose: bool, quiet: bool):
    global _verbose
    _verbose = verbose
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("urllib3", "alembic", "matplotlib", "PIL", "httpx", "mlflow.store"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    return load_params(params_path)


def _stage_command(name: str, doc: str):
    def command(
        params: ParamsOpt = DEFAULT_PARAMS, verbose: VerboseOpt = False, quiet: QuietOpt = False
    ) -> None:
        from transferlab.stages import STAGES
        from transferlab.workspace import workspace_lock

        loaded = _setup(params, verbose, quiet)
        with workspace_lock(Path.cwd()):
            summary = STAGES[name].run(loaded, Path.cwd())
        if not quiet:
            out.print_json(data=summary)

    command.__doc__ = doc
    app.command(name)(command)


_stage_command(
    "pull", "Validate the dataset's images, copy them to data/, write data/manifest.csv."
)
_stage_command("split", "Stratified, seeded train/val/test split: data/split.csv.")
_stage_command("features", "Frozen-backbone features (cached by image content): features/.")
_stage_command("svm", "Linear SVM (liblinear) on the features, C by cross-validation: models/svm/.")
_stage_command(
    "attack",
    "White-box, black-box and transfer attacks over the eps sweep: metrics/attack.json.",
)
_stage_command("report", "Plots, reports/results.json, and one MLflow run with the lineage.")


demo_app = typer.Typer(
    help="Small demonstrations on the public ImageNet model.", no_args_is_help=True
)
app.add_typer(demo_app, name="demo")


@demo_app.command("fgsm")
def demo_fgsm(
    image: Annotated[Path, typer.Argument(help="an image file (jpg, png...)", exists=True)],
    eps: Annotated[str, typer.Option(help="L-inf budget in pixel space, e.g. 2/255")] = "2/255",
    png: Annotated[Path, typer.Option("--out", help="PNG to write")] = Path("fgsm_demo.png"),
    target: Annotated[
        int | None, typer.Option(help="ImageNet class index to aim for (targeted FGSM)")
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """What the ImageNet model predicts for IMAGE before and after FGSM, as text and a PNG.

    Example: transferlab demo fgsm coffee.png --eps 2/255
    """
    from transferlab.config import parse_eps
    from transferlab.demo import fgsm_demo

    global _verbose
    _verbose = verbose
    try:
        eps_value = parse_eps(eps)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--eps") from None
    result = fgsm_demo(image, eps=eps_value, out=png, target=target)
    for when in ("before", "after"):
        line = ", ".join(f"{name} {p:.1%}" for name, p in result[when])
        out.print(f"[bold]{when:>6}[/bold] FGSM eps={eps}: {line}", highlight=False)
    verdict = "changed" if result["changed"] else "unchanged"
    out.print(f"top-1 {verdict}; picture: {result['png']}", highlight=False)


@app.command()
def run(params: ParamsOpt = DEFAULT_PARAMS, verbose: VerboseOpt = False, quiet: QuietOpt = False):
    """Run the whole pipeline as a Prefect flow (ephemeral mode: no server needed).

    Stages whose inputs and params did not change are skipped (Prefect result cache).

    Example: transferlab run --params params.yaml
    """
    _setup(params, verbose, quiet)
    from flows.pipeline import pipeline  # the orchestration layer; the library never imports it

    result = pipeline(params_path=str(params), workdir=str(Path.cwd()))
    print_results(result["report"])


def _table(title: str, rows: list[dict]) -> Table:
    table = Table(title=title)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    for key in keys:
        table.add_column(key)
    for row in rows:
        table.add_row(*(_cell(row.get(k)) for k in keys))
    return table


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def print_results(report: dict) -> None:
    out.print(_table("transferlab results", report["table"]))
    ml = report["mlflow"]
    out.print(f"MLflow run {ml['parent']} in {ml['tracking_uri']}")
    if report.get("html"):
        out.print(f"Report: {report['html']}")
    out.print("Open the MLflow UI with: [bold]make ui[/bold]  (then http://127.0.0.1:5000)")


@app.command()
def compare(
    params: ParamsOpt = DEFAULT_PARAMS,
    last: Annotated[int, typer.Option("--last", "-n", help="how many pipeline runs", min=1)] = 5,
    verbose: VerboseOpt = False,
):
    """Table of the last pipeline runs from MLflow: method, accuracy, robust accuracy, time.

    Robust accuracy is at attack.report_eps. Example: transferlab compare --last 10
    """
    from transferlab.tracking import recent_runs

    rows = recent_runs(_setup(params, verbose, True), Path.cwd(), last=last)
    if not rows:
        out.print("No runs yet: run [bold]transferlab run[/bold] first.")
        return
    out.print(_table(f"last {last} pipeline runs", rows))


@app.command()
def status(params: ParamsOpt = DEFAULT_PARAMS, verbose: VerboseOpt = False):
    """Which stages are up to date or stale (dvc status), the feature cache, and the last runs."""
    import json as _json
    import subprocess

    from transferlab.tracking import recent_runs

    p = _setup(params, verbose, True)
    root = Path.cwd()
    if (root / "dvc.yaml").is_file():
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", "status", "--json"], capture_output=True, text=True
        )
        if proc.returncode == 0:
            stale = _json.loads(proc.stdout or "{}")
            from transferlab.stages import STAGES

            rows = [
                {"stage": name, "state": "stale" if name in stale else "up to date"}
                for name in STAGES
            ]
            out.print(_table("pipeline (dvc status)", rows))
        else:
            out.print(f"[yellow]dvc status failed:[/yellow] {proc.stderr.strip()[:300]}")
    cache = root / p.features.cache_dir
    shards = list(cache.rglob("shard-*.npz")) if cache.is_dir() else []
    size = sum(s.stat().st_size for s in shards)
    out.print(f"feature cache {cache}: {len(shards)} shards, {size / 1e6:.1f} MB")
    rows = recent_runs(p, root, last=3)
    out.print(_table("last runs", rows) if rows else "no MLflow runs yet")


@app.command()
def ui(
    params: ParamsOpt = DEFAULT_PARAMS,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 5000,
):
    """Start the MLflow UI on this workspace's tracking store and print its URL (Ctrl-C stops)."""
    import subprocess

    from transferlab.tracking import ui_command

    cmd = ui_command(_setup(params, False, True), Path.cwd(), host=host, port=port)
    out.print(f"MLflow UI: [bold]http://{host}:{port}[/bold]  (Ctrl-C to stop)")
    raise typer.Exit(subprocess.call(cmd))


def _terminate(signum, frame):  # noqa: ARG001 - signal handler signature
    # Turn SIGTERM into an exception so context managers close: temp files are removed and an
    # open MLflow run is marked KILLED instead of being left RUNNING.
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def main() -> None:
    """Console entry point: one clear line per error, tracebacks only with --verbose."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app(standalone_mode=False)
    except ParamsError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        err.print("interrupted: finished outputs are kept; re-run to continue")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence for a CLI
        if _verbose:
            err.print_exception()
        err.print(
            f"[red]error:[/red] {type(exc).__name__}: {exc}"
            "  (re-run with --verbose for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
