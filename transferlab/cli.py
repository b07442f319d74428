"""``transferlab <stage>``: what ``dvc.yaml`` runs, and ``transferlab run``: the whole Prefect flow.

Exit codes: 0 success, 1 a stage failed (bad data, unreachable server...), 2 bad params or usage.
"""

from __future__ import annotations

import logging
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

        summary = STAGES[name].run(_setup(params, verbose, quiet), Path.cwd())
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
_stage_command("attack", "FGSM over the eps sweep on each adapted model: metrics/attack.json.")
_stage_command("report", "Plots, reports/results.json, and one MLflow run with the lineage.")


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


def print_results(report: dict) -> None:
    table = Table(title="transferlab results")
    rows = report["table"]
    for key in rows[0]:
        table.add_column(key)
    for row in rows:
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))
    out.print(table)
    ml = report["mlflow"]
    out.print(f"MLflow run {ml['parent']} in {ml['tracking_uri']}")
    out.print("Open the MLflow UI with: [bold]make ui[/bold]  (then http://127.0.0.1:5000)")


def main() -> None:
    """Console entry point: one clear line per error, tracebacks only with --verbose."""
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
    except click.exceptions.Abort:
        err.print("aborted")
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
