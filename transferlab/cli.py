"""``transferlab <stage>``: what ``dvc.yaml`` runs, and ``transferlab run``: the whole Prefect flow.

Exit codes: 0 success, 1 a stage failed (bad data, unreachable server...), 2 bad params or usage.
"""

from __future__ import annotations

import logging
import os
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
    if quiet:  # for logs: no progress bars either (tqdm reads its defaults from TQDM_*)
        os.environ["TQDM_DISABLE"] = "1"
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("urllib3", "alembic", "matplotlib", "PIL", "httpx", "mlflow.store"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    return load_params(params_path)


def _stage_command(name: str, doc: str):
    def command(
        params: ParamsOpt = DEFAULT_PARAMS, verbose: VerboseOpt = False, quiet: QuietOpt = False
    ) -> None:
        loaded = _setup(params, verbose, quiet)  # first: quiet mode must precede tqdm's import
        from transferlab.stages import STAGES
        from transferlab.workspace import workspace_lock

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
_stage_command("top", "A new head on the frozen backbone (SGD, early stopping): models/top/.")
_stage_command("full", "Full fine-tuning, checkpointed every epoch, resumable: models/full/.")
_stage_command(
    "attack",
    "White-box, black-box and transfer attacks over the eps sweep: metrics/attack.json.",
)
_stage_command("report", "Plots, reports/results.json, and one MLflow run with the lineage.")
_stage_command(
    "gate", "Robustness regression gate: promote each new model version to champion if it passes."
)


ModelArg = Annotated[
    str, typer.Argument(help="registered model: NAME@alias, NAME/version or NAME (latest)")
]


@app.command("lineage")
def lineage(
    model: ModelArg,
    params: ParamsOpt = DEFAULT_PARAMS,
    verbose: VerboseOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """The data, code and params behind a registered model version.

    Example: transferlab lineage transferlab-svm@champion
    """
    from transferlab.tracking import model_lineage

    info = model_lineage(_setup(params, verbose, True), Path.cwd(), model)
    if as_json:
        out.print_json(data=info)
        return
    m = info["model"]
    aliases = f" ({', '.join(m['aliases'])})" if m["aliases"] else ""
    out.print(f"[bold]{m['name']} version {m['version']}[/bold]{aliases}  run {m['run_id']}")
    for title in ("data", "code", "pipeline"):
        out.print(f"[bold]{title}[/bold]")
        for key, value in info[title].items():
            out.print(f"  {key}: {value}", highlight=False)
    out.print("[bold]params[/bold]")
    for key, value in info["params"].items():
        out.print(f"  {key} = {value}", highlight=False)


@app.command("attack-eval")
def attack_eval(
    model: ModelArg,
    params: ParamsOpt = DEFAULT_PARAMS,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Attack a registered model version on this workspace's test split and log the run.

    Example: transferlab attack-eval transferlab-svm@champion
    """
    from transferlab.stages import attack_registered

    summary = attack_registered(_setup(params, verbose, quiet), Path.cwd(), model=model)
    if not quiet:
        out.print_json(data=summary)


experiment_app = typer.Typer(help="Experiments that compare the adaptation methods.")
app.add_typer(experiment_app, name="experiment")


@experiment_app.command("learning-curve")
def learning_curve(
    params: ParamsOpt = DEFAULT_PARAMS, verbose: VerboseOpt = False, quiet: QuietOpt = False
) -> None:
    """svm vs top vs full on few-shot Fashion-MNIST subsets (params: learning_curve).

    Writes <out_dir>/runs.csv, summary.md and curve.png and logs to MLflow.

    Example: transferlab experiment learning-curve --params params.yaml
    """
    from transferlab.experiments.learning_curve import learning_curve_experiment

    result = learning_curve_experiment(_setup(params, verbose, quiet), Path.cwd())
    if not quiet:
        out.print_json(data={k: v for k, v in result.items() if k != "summary"})
        out.print(Path(result["table"]).read_text())


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
    from transferlab.tracking import check_tracking_store

    # before Prefect even starts: a dead tracking server should cost seconds, not a whole run
    check_tracking_store(_setup(params, verbose, quiet), Path.cwd())
    from flows.pipeline import pipeline  # the orchestration layer; the library never imports it

    result = pipeline(params_path=str(params), workdir=str(Path.cwd()))
    print_results(result["report"])


# ------------------------------------------------------------------ cache commands

cache_app = typer.Typer(
    help=(
        "Inspect and maintain the feature cache (features.cache_dir in params.yaml, or "
        "--cache-dir). A team can share one cache folder on a network disk.\n\n"
        "  transferlab cache info              # size, entries per key space, last hit rate\n\n"
        "  transferlab cache verify --repair   # check every shard's digest, drop corrupt ones\n\n"
        "  transferlab cache gc -m other/data/manifest.csv   # drop unreferenced entries"
    ),
    no_args_is_help=True,
)
app.add_typer(cache_app, name="cache")

CacheDirOpt = Annotated[
    Path | None,
    typer.Option("--cache-dir", help="cache folder (default: features.cache_dir of --params)"),
]


def _cache_root(params: Path, cache_dir: Path | None, verbose: bool, quiet: bool) -> Path:
    if cache_dir is not None:
        _setup_logging_only(verbose, quiet)
        return cache_dir
    return Path.cwd() / _setup(params, verbose, quiet).features.cache_dir


def _setup_logging_only(verbose: bool, quiet: bool) -> None:
    global _verbose
    _verbose = verbose
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)


@cache_app.command("info")
def cache_info(
    params: ParamsOpt = DEFAULT_PARAMS,
    cache_dir: CacheDirOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Size, shards and entries per key space, and the hit rate of the last run."""
    from transferlab import cache

    out.print_json(data=cache.info(_cache_root(params, cache_dir, verbose, quiet)))


@cache_app.command("verify")
def cache_verify(
    params: ParamsOpt = DEFAULT_PARAMS,
    cache_dir: CacheDirOpt = None,
    repair: Annotated[
        bool, typer.Option("--repair", help="delete corrupt shards (re-extracted next run)")
    ] = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Check every shard's sha256 against its name; exit 1 if any is corrupt (and not repaired).

    Example: transferlab cache verify --repair
    """
    from transferlab import cache

    report = cache.verify(_cache_root(params, cache_dir, verbose, quiet), repair=repair)
    out.print_json(data=report.as_dict())
    if not report.ok and not repair:
        raise typer.Exit(1)


@cache_app.command("gc")
def cache_gc(
    params: ParamsOpt = DEFAULT_PARAMS,
    cache_dir: CacheDirOpt = None,
    manifest: Annotated[
        list[Path] | None,
        typer.Option("--manifest", "-m", help="another manifest whose images to keep (repeat)"),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="count, delete nothing")] = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Drop cache entries that no manifest references: this workspace's data/manifest.csv plus
    every --manifest. Run it while no extraction is filling the cache.

    Example: transferlab cache gc -m ../other-project/data/manifest.csv
    """
    from transferlab import cache
    from transferlab.data import read_manifest

    root = _cache_root(params, cache_dir, verbose, quiet)
    manifests = list(manifest or [])
    own = Path.cwd() / "data" / "manifest.csv"
    if own.is_file():
        manifests.append(own)
    if not manifests:
        raise click.UsageError(
            "no manifest to keep: run in a workspace with data/manifest.csv or pass --manifest"
        )
    keep: set[str] = set()
    for m in manifests:
        if not m.is_file():
            raise click.UsageError(f"manifest not found: {m}")
        keep.update(r["sha256"] for r in read_manifest(m))
    report = cache.gc(root, keep, dry_run=dry_run)
    out.print_json(data={"manifests": [str(m) for m in manifests], **report.as_dict()})


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
        # Without standalone mode typer returns (not raises) the exit code of a typer.Exit and
        # turns Ctrl-C / SIGTERM into 130.
        code = app(standalone_mode=False)
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
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
