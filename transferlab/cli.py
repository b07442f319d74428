"""``transferlab <stage>``: what ``dvc.yaml`` runs, and ``transferlab run``: the whole Prefect flow.

Exit codes: 0 success, 1 a stage failed (bad data, unreachable server...), 2 bad params or usage.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from transferlab.config import DEFAULT_PARAMS, ParamsError, load_params
from transferlab.methods import METHODS
from transferlab.redact import install_log_redaction, redact


def _help(doc: str) -> str:
    """A docstring as help text: rich keeps single line breaks, so each prose paragraph becomes
    one line (the terminal wraps it); paragraphs that start indented stay as written."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(p if p.startswith(" ") else " ".join(p.split("\n")) for p in paragraphs)


def _examples(*lines: str) -> str:
    """The epilog under a command's options: one example invocation per line."""
    return "Examples:\n" + "\n".join(f"  {line}" for line in lines)


app = typer.Typer(
    help=_help(
        """Adapt an ImageNet CNN to your images (a linear SVM on its features, a new top layer,
        or full fine-tuning) and measure how easily each adapted model is fooled by adversarial
        examples.

        Every command reads params.yaml in the current folder (or --params PATH) and works in
        the current folder: data/, features/, models/, metrics/, plots/, reports/, and an
        MLflow store (mlruns.db, mlartifacts/). Progress bars go to stderr; --quiet turns them
        and the INFO logs off. Run `transferlab COMMAND --help` for what a command reads and
        writes."""
    ),
    epilog=_examples(
        "transferlab run                 # the whole pipeline as a Prefect flow",
        "dvc repro                       # the same stages, one process each (dvc.yaml)",
        "transferlab features            # one stage",
        "transferlab compare --last 5    # accuracy and robustness of the last runs",
        "transferlab full --help         # what a stage reads and writes",
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
    _configure_logging(level)
    for noisy in ("urllib3", "alembic", "matplotlib", "PIL", "httpx", "mlflow.store"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    return load_params(params_path)


class _LogFormat(logging.Formatter):
    """``LEVEL logger [task or flow run]: message``, with the time when stderr is a log file.

    Prefect puts the run's name on its records (``task_run_name``, ``flow_run_name``); without
    it, a log of a whole run has dozens of "Finished in state Completed()" naming nothing.
    """

    def format(self, record: logging.LogRecord) -> str:
        run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        record.where = f"{record.name} [{run}]" if run else record.name
        return super().format(record)


class _FailureOnce(logging.Filter):
    """Drops Prefect's records of a failure (a failed task or flow, its traceback): the CLI
    prints the error itself, as one line (``main``). Retries and warnings still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        failed = record.getMessage().startswith("Finished in state Failed")
        return not (failed or record.levelno >= logging.ERROR)


def _configure_logging(level: int) -> None:
    """One stderr handler for every logger (Prefect's included), with secrets redacted."""
    fmt = "%(levelname)s %(where)s: %(message)s"
    if not sys.stderr.isatty():
        fmt = "%(asctime)s " + fmt
        # MLflow draws its own tqdm bars (artifact up/downloads), cursor codes and all
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow would give its loggers a handler and format of their own (lines starting with a
    # date, apart from ours); let them reach this one instead.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    handler = logging.StreamHandler()
    handler.setFormatter(_LogFormat(fmt, datefmt="%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    install_log_redaction()


def _orchestration(module: str):
    """``transferlab_flows.<module>``, imported at call time: the orchestration layer sits above
    the library, which never imports it, and it needs the optional Prefect extra."""
    import importlib

    try:
        return importlib.import_module(f"transferlab_flows.{module}")
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in {"prefect", "transferlab_flows"}:
            raise
        err.print(
            f"[red]error:[/red] this command runs a Prefect flow, and {exc.name} is not "
            "installed; install the orchestration extra: pip install 'transferlab\\[orchestrate]' "
            "(or use `dvc repro` / `transferlab <stage>`)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def _stage_command(
    name: str, doc: str, more: str, *, reads: str, writes: str, examples: tuple[str, ...]
):
    def command(
        params: ParamsOpt = DEFAULT_PARAMS, verbose: VerboseOpt = False, quiet: QuietOpt = False
    ) -> None:
        loaded = _setup(params, verbose, quiet)  # first: quiet mode must precede tqdm's import
        from transferlab.progress import in_stage, logs_above_bars
        from transferlab.stages import STAGES
        from transferlab.workspace import workspace_lock

        with workspace_lock(Path.cwd()), logs_above_bars(), in_stage(name):
            summary = STAGES[name].run(loaded, Path.cwd())
        if not quiet:
            out.print_json(data=summary)

    command.__doc__ = doc
    help_text = _help(f"{doc}\n\n{more}\n\nReads: {reads}\n\nWrites: {writes}")
    app.command(name, help=help_text, epilog=_examples(*examples))(command)


# What each stage reads and writes, as STAGES (and dvc.yaml) declare it: tests/unit/test_cli.py
# checks that every declared path and params section is named here.
_stage_command(
    "pull",
    "Validate the dataset's images, copy them to data/, write data/manifest.csv.",
    "Every image is decoded and checked (size, pixels, duplicates); byte-identical copies are "
    "rejected, since they would leak between train and test.",
    reads="the images data.source names (a folder, IDX files, an HTTP archive, S3, a "
    "torchvision dataset...), and labelled/ (labels merged by `transferlab label import`); "
    "params: data.",
    writes="data/images/ (one folder per class), data/manifest.csv (path, label, sha256, size "
    "per image), data/rejected.json (what was left out, and why).",
    examples=("transferlab pull", "transferlab pull --params my-params.yaml --verbose"),
)
_stage_command(
    "split",
    "Stratified, seeded train/val/test split: data/split.csv.",
    "split.shots picks N training images per class (few-shot); val and test stay the same.",
    reads="data/manifest.csv; params: split.",
    writes="data/split.csv (path, label, sha256, split).",
    examples=("transferlab split",),
)
_stage_command(
    "features",
    "Frozen-backbone features (cached by image content): features/.",
    "Only images the cache has not seen are extracted; the bar shows img/s.",
    reads="data/manifest.csv, data/images/; params: data, features.",
    writes="features/features.npz (features, sha256, path, label); fills the feature cache "
    "(features.cache_dir, see `transferlab cache --help`).",
    examples=("transferlab features", "transferlab features --quiet   # logs without bars"),
)
# the registered methods' files, for the help of the stages that read them all
_ATTACKED = ", ".join(f"{m.model_dir}/" for m in METHODS.values() if m.attackable)
_METHOD_FILES = ", ".join(f"{m.metrics_file}, {m.model_dir}/" for m in METHODS.values())


def _method_commands() -> None:
    """One command per registered method; what it reads and writes comes from its stage."""
    for name, method in METHODS.items():
        _stage_command(
            name,
            method.summary,
            method.details,
            reads=f"{', '.join(method.deps)}; params: {', '.join(method.sections)}.",
            writes=f"{method.model_dir}/ (the classifier), {method.metrics_file} "
            "(accuracies, choices, per-epoch history, confusion matrix).",
            examples=(f"transferlab {name}", f"transferlab {name} -q 2> {name}.log   # a log file"),
        )


_method_commands()
_stage_command(
    "attack",
    "White-box, black-box and transfer attacks over the eps sweep: metrics/attack.json.",
    "Every model in attack.models, every attack in attack.attacks at every attack.eps; finished "
    "batches are kept, so a killed run resumes.",
    reads=f"{_ATTACKED}, data/split.csv, data/images/; params: attack, data, features.",
    writes="metrics/attack.json, metrics/transfer.json, plots/robustness.csv, "
    "plots/transfer.png, plots/adversarial_examples.png; finished batches in attack.work_dir.",
    examples=("transferlab attack",),
)
_stage_command(
    "report",
    "Plots, reports/results.json, and one MLflow run with the lineage.",
    "The MLflow run has one nested run and one registered model version per method; "
    "reports/index.html shows the results table and the plots.",
    reads=f"{_METHOD_FILES}, metrics/attack.json, plots/robustness.csv, data/manifest.csv; "
    "params: tracking.",
    writes="plots/robustness.png, plots/confusion/, reports/results.json, reports/index.html; "
    "runs and model versions in the MLflow store (tracking.tracking_uri).",
    examples=("transferlab report", "MLFLOW_TRACKING_URI=http://127.0.0.1:5000 transferlab report"),
)
_stage_command(
    "gate",
    "Robustness regression gate: promote each new model version to champion if it passes.",
    "The alias (gate.alias) moves to a method's new version only if its clean and robust "
    "accuracy clear params.gate.",
    reads="reports/results.json, metrics/attack.json, the MLflow model registry; params: gate, "
    "tracking.",
    writes="reports/gate.json (each decision and why); the alias in the registry.",
    examples=("transferlab gate", "transferlab lineage transferlab-svm@champion"),
)


ModelArg = Annotated[
    str, typer.Argument(help="registered model: NAME@alias, NAME/version or NAME (latest)")
]


@app.command(
    "lineage",
    epilog=_examples(
        "transferlab lineage transferlab-svm@champion",
        "transferlab lineage transferlab-full/3 --json",
    ),
)
def lineage(
    model: ModelArg,
    params: ParamsOpt = DEFAULT_PARAMS,
    verbose: VerboseOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """The data, code and params behind a registered model version.

    Reads: the MLflow model registry and the version's run (tracking.tracking_uri; models are
    named EXPERIMENT-METHOD after tracking.experiment).

    Writes: nothing.
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


@app.command(
    "attack-eval",
    epilog=_examples(
        "transferlab attack-eval transferlab-svm@champion",
        "transferlab attack-eval transferlab-full/2 --params params.yaml",
    ),
)
def attack_eval(
    model: ModelArg,
    params: ParamsOpt = DEFAULT_PARAMS,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Attack a registered model version on this workspace's test split and log the run.

    Reads: the model from the MLflow registry, data/split.csv and data/images/ (the test
    split); params: attack.

    Writes: metrics/attack_eval/NAME-vVERSION.json and an MLflow run linked to the version.
    """
    loaded = _setup(params, verbose, quiet)
    from transferlab.progress import logs_above_bars
    from transferlab.stages import attack_registered
    from transferlab.workspace import workspace_lock

    with workspace_lock(Path.cwd()), logs_above_bars():  # it writes metrics/ and MLflow
        summary = attack_registered(loaded, Path.cwd(), model=model)
    if not quiet:
        out.print_json(data=summary)


experiment_app = typer.Typer(
    help="Experiments that compare the adaptation methods and the labelling strategies.",
    epilog=_examples(
        "transferlab experiment learning-curve", "transferlab experiment active-learning"
    ),
    no_args_is_help=True,
)
app.add_typer(experiment_app, name="experiment")


def _experiment(name: str):
    """Registers an ``experiment NAME`` command (the function's docstring is its help)."""
    return experiment_app.command(
        name,
        epilog=_examples(
            f"transferlab experiment {name}",
            f"transferlab experiment {name} --params params.yaml --quiet",
        ),
    )


def _run_experiment(
    experiment, loaded, quiet: bool, *, lock: bool = True, text: str = "", hide: tuple = ()
) -> None:
    """Run ``experiment(params, workspace)`` with the logs above its bars, under the workspace
    lock when ``lock`` (it writes its out_dir and MLflow); print its result (less ``hide``)
    and the file its ``text`` key names."""
    from transferlab.progress import logs_above_bars
    from transferlab.workspace import workspace_lock

    with workspace_lock(Path.cwd()) if lock else nullcontext(), logs_above_bars():
        result = experiment(loaded, Path.cwd())
    if not quiet:
        out.print_json(data={k: v for k, v in result.items() if k not in hide})
        if text:
            out.print(Path(result[text]).read_text())


@_experiment("learning-curve")
def learning_curve(
    params: ParamsOpt = DEFAULT_PARAMS, verbose: VerboseOpt = False, quiet: QuietOpt = False
) -> None:
    """Every method on nested Fashion-MNIST subsets (N per class up to 1000, 96 px): which
    wins at which training-set size, with 95% intervals, and where the lecture's ordering holds.

    Reads: the Fashion-MNIST IDX files in learning_curve.idx_dir; params: learning_curve
    (its method_overrides change a method's section for this experiment only), features and
    the methods' sections. A bar counts the runs; the trainers show their own. The backbone's
    features of the pool and the test set are cached under features.cache_dir.

    Writes: learning_curve.out_dir/runs.csv (every run), outcomes.npz (every run's per-image
    test outcomes), summary.md (tables with intervals, paired differences, the lecture's
    ordering per N, the command), curve.png; an MLflow run per method. The outputs are
    rewritten after every run, so a run stopped for time keeps what it finished.
    """
    loaded = _setup(params, verbose, quiet)
    from transferlab.experiments.learning_curve import learning_curve_experiment

    _run_experiment(learning_curve_experiment, loaded, quiet, text="table", hide=("summary",))


@_experiment("active-learning")
def active_learning(
    params: ParamsOpt = DEFAULT_PARAMS, verbose: VerboseOpt = False, quiet: QuietOpt = False
) -> None:
    """Which query strategy to use under a labelling budget: simulated labelling rounds from a
    seed set, for every strategy, learner (svm, top) and seed, on Fashion-MNIST and the
    workspace's photos.

    Reads: the Fashion-MNIST IDX files in active_learning.idx_dir, features/features.npz and
    data/split.csv when present (the photos); params: active_learning, features, svm, top. The
    test set never enters the pool. A bar counts the runs.

    Writes: active_learning.out_dir/runs.csv (every round), summary.json, summary.md (accuracy
    against labels with Wilson intervals and seed spread, AUC, labels to reach the target), and
    curve.png; an MLflow run with a nested run per strategy.
    """
    loaded = _setup(params, verbose, quiet)
    from transferlab.active.experiment import active_learning_experiment

    _run_experiment(active_learning_experiment, loaded, quiet, text="summary")


@_experiment("new-class")
def new_class(
    params: ParamsOpt = DEFAULT_PARAMS, verbose: VerboseOpt = False, quiet: QuietOpt = False
) -> None:
    """What adding a category costs: old-class accuracy before and after (forgetting), and the
    new class's accuracy against its number of training images.

    Reads: features/features.npz and data/split.csv (the old classes), new_class.path (images
    of the new class; checked like pull's, features through the cache), models/<method> of
    the listed methods that fine-tune their backbone (full, adv: new_class.fine_tuned extends
    their head or retrains them); params: new_class, data, features and the methods' sections.

    Writes: new_class.out_dir/runs.csv, summary.json, summary.md and new_class.png.
    """
    loaded = _setup(params, verbose, quiet)
    from transferlab.active.new_class import new_class_experiment

    _run_experiment(new_class_experiment, loaded, quiet, lock=False)


label_app = typer.Typer(
    help="Spend a labelling budget well: which images to label next, and merging the labels.",
    epilog=_examples(
        "transferlab label suggest --budget 50",
        "transferlab label import labels/suggest.csv",
    ),
    no_args_is_help=True,
)
app.add_typer(label_app, name="label")


def _label_error(exc: Exception) -> None:
    err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@label_app.command(
    "suggest",
    epilog=_examples(
        "transferlab label suggest --budget 50",
        "transferlab label suggest --budget 20 --strategy badge --model top",
        "transferlab label suggest --from new_photos/ --out labels/round2.csv",
    ),
)
def label_suggest(
    budget: Annotated[
        int | None, typer.Option("--budget", "-n", min=1, help="images to suggest (label.budget)")
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            help="random | least_confidence | margin | entropy | kcenter | badge (label.strategy)"
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="trained model under models/ that scores (label.model)")
    ] = None,
    source: Annotated[
        Path | None,
        typer.Option(
            "--from", help="folder, .csv or .json of unlabelled images (label.unlabelled)"
        ),
    ] = None,
    csv_out: Annotated[Path | None, typer.Option("--out", help="CSV to write (label.out)")] = None,
    params: ParamsOpt = DEFAULT_PARAMS,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Pick the unlabelled images worth labelling next and write them to a CSV.

    The images pass pull's checks (bad files are left out, each with its reason), their
    features come from the cache (only new images are extracted), the model scores them and
    the strategy picks. Fill in the CSV's label column, then run `transferlab label import`.

    Reads: label.unlabelled (a folder, or a .csv with a path column, or a .json list),
    models/<label.model>, features/features.npz and data/split.csv (what is labelled already),
    the feature cache; params: label, data, features.

    Writes: label.out (rank, path, thumbnail, guess, score, strategy, label) atomically and its
    thumbs/ folder.
    """
    from transferlab.active.suggest import LabelError

    loaded = _setup(params, verbose, quiet)
    from transferlab.active.suggest import suggest
    from transferlab.progress import logs_above_bars
    from transferlab.workspace import workspace_lock

    try:
        with workspace_lock(Path.cwd()), logs_above_bars():
            summary = suggest(
                loaded,
                Path.cwd(),
                budget=budget,
                strategy=strategy,
                model=model,
                source=source,
                out=csv_out,
            )
    except LabelError as exc:
        _label_error(exc)
    if not quiet:
        out.print_json(data=summary)


@label_app.command(
    "import",
    epilog=_examples(
        "transferlab label import labels/suggest.csv && dvc repro",
        "transferlab label import labels/new.csv --new-class reptiles",
    ),
)
def label_import(
    csv_file: Annotated[Path, typer.Argument(help="CSV with path and label columns")],
    new_class: Annotated[
        list[str] | None,
        typer.Option("--new-class", help="a class the data does not have yet (repeat)"),
    ] = None,
    params: ParamsOpt = DEFAULT_PARAMS,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Merge returned labels into the data: all rows or none.

    Every row is checked before anything is written: an unknown class (unless named with
    --new-class), an image listed twice or already in the data, a missing file or one that
    fails pull's checks refuses the whole file, with every problem and its row. Rows with an
    empty label are skipped. Then run `dvc repro` (or `transferlab run`): pull merges
    labelled/ into data/ (a new data version), features are extracted only for the new
    images, and the models retrain.

    Reads: the CSV, data/manifest.csv, labelled/; params: data.

    Writes: labelled/<class>/<digest>.<ext>.
    """
    from transferlab.active.suggest import LabelError

    loaded = _setup(params, verbose, quiet)
    from transferlab.active.importer import import_labels
    from transferlab.workspace import workspace_lock

    try:
        with workspace_lock(Path.cwd()):
            summary = import_labels(
                loaded, Path.cwd(), csv_file.resolve(), new_classes=tuple(new_class or ())
            )
    except LabelError as exc:
        _label_error(exc)
    if not quiet:
        out.print_json(data=summary)


demo_app = typer.Typer(
    help="Small demonstrations on the public ImageNet model.",
    epilog=_examples("transferlab demo fgsm photo.jpg"),
    no_args_is_help=True,
)
app.add_typer(demo_app, name="demo")


@demo_app.command(
    "fgsm",
    epilog=_examples(
        "transferlab demo fgsm photo.jpg",
        "transferlab demo fgsm photo.jpg --eps 4/255 --target 1 --out goldfish.png",
    ),
)
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

    Reads: IMAGE and the backbone's packaged ImageNet weights (no params file).

    Writes: the PNG given by --out (the image, the perturbation and the adversarial image).
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


@app.command(
    epilog=_examples(
        "transferlab run",
        "transferlab run --params params.yaml --quiet",
        "PREFECT_API_URL=http://127.0.0.1:4200/api transferlab run",
    )
)
def run(params: ParamsOpt = DEFAULT_PARAMS, verbose: VerboseOpt = False, quiet: QuietOpt = False):
    """Run the whole pipeline as a Prefect flow (ephemeral mode: no server needed).

    Stages whose inputs and params did not change are skipped (Prefect result cache).

    Reads: params.yaml and the dataset data.source names.

    Writes: what every stage writes (data/, features/, models/, metrics/, plots/, reports/; see
    `transferlab STAGE --help`), the MLflow runs, and Prefect's results; prints the results
    table.
    """
    from transferlab.tracking import check_tracking_store

    # before Prefect even starts: a dead tracking server should cost seconds, not a whole run
    loaded = _setup(params, verbose, quiet)
    check_tracking_store(loaded, Path.cwd())
    prefect_api = _orchestration("ephemeral").prefect_api
    pipeline = _orchestration("pipeline").pipeline
    from transferlab.progress import logs_above_bars

    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_FailureOnce())
    # a temporary Prefect server that dies with this process (unless PREFECT_API_URL is set)
    with prefect_api(), logs_above_bars():
        result = pipeline(params_path=str(params), workdir=str(Path.cwd()))
    print_results(result["report"], report_eps=loaded.attack.report_eps)


# ------------------------------------------------------------------ cache commands

cache_app = typer.Typer(
    help=(
        "Inspect and maintain the feature cache (features.cache_dir in params.yaml, or "
        "--cache-dir). A team can share one cache folder on a network disk."
    ),
    epilog=_examples(
        "transferlab cache info                # size, entries, last hit rate",
        "transferlab cache verify --repair     # drop corrupt shards",
        "transferlab cache gc -m ../b/data/manifest.csv   # keep b's images too",
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
    _configure_logging(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


@cache_app.command(
    "info",
    epilog=_examples("transferlab cache info", "transferlab cache info --cache-dir /shared/cache"),
)
def cache_info(
    params: ParamsOpt = DEFAULT_PARAMS,
    cache_dir: CacheDirOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Size, shards and entries per key space, and the hit rate of the last run.

    Reads: the cache folder.

    Writes: nothing; prints JSON.
    """
    from transferlab import cache

    out.print_json(data=cache.info(_cache_root(params, cache_dir, verbose, quiet)))


@cache_app.command(
    "verify",
    epilog=_examples("transferlab cache verify", "transferlab cache verify --repair"),
)
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

    Reads: every shard of the cache folder.

    Writes: with --repair, deletes the corrupt shards (their images are extracted again on the
    next `transferlab features`); prints JSON.
    """
    from transferlab import cache

    report = cache.verify(_cache_root(params, cache_dir, verbose, quiet), repair=repair)
    out.print_json(data=report.as_dict())
    if not report.ok and not repair:
        raise typer.Exit(1)


@cache_app.command(
    "gc",
    epilog=_examples(
        "transferlab cache gc --dry-run",
        "transferlab cache gc -m ../other-project/data/manifest.csv",
    ),
)
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
    """Drop cache entries that no manifest references.

    Run it while no extraction is filling the cache.

    Reads: the cache folder, this workspace's data/manifest.csv and every --manifest.

    Writes: deletes the unreferenced entries (nothing with --dry-run); prints JSON.
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


# Short, distinct headers for the results table, so it fits 80 columns (a log file's width).
_HEADERS = {
    "method": "method",
    "test_acc": "test",
    "val_acc": "val",
    "train_seconds": "train s",
    "trained_params": "params",
    "regime": "regime",
}


def _header(key: str, eps: str) -> str:
    if key in _HEADERS:
        return _HEADERS[key]
    if key.startswith("robust_acc_"):
        return f"{key.removeprefix('robust_acc_')}@{eps}"
    return key.replace("_", " ")


def _compact(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
        return f"{value / 1e6:.2f}M" if value >= 1_000_000 else f"{value / 1e3:.0f}k"
    if isinstance(value, float) and value >= 10:
        return f"{value:.0f}"
    return _cell(value)


def results_tables(rows: list[dict], *, report_eps: float) -> list[Table]:
    """The results as two tables that each fit 80 columns (a log file's width): accuracy, time
    and size per method, then robust accuracy per attack (``<attack>@<eps>``), a column each.
    One table wrapped its rows or cut its headers once a third attack joined the run."""
    from rich import box

    from transferlab.eps import Eps

    eps = Eps(report_eps).label
    # 80 columns leave no room for intervals: results.json and the HTML report carry them
    every = list(dict.fromkeys(k for row in rows for k in row))
    keys = [k for k in every if not k.endswith(("_ci_low", "_ci_high"))]
    robust = [k for k in keys if k.startswith("robust_acc_")]
    parts = [
        ("transferlab results (test accuracy)", [k for k in keys if k not in robust]),
        (f"robust accuracy at eps {eps}", ["method", *robust]),
    ]
    tables = []
    for title, part in parts:
        if len(part) < 2:
            continue
        table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
        for key in part:
            numeric = all(isinstance(r.get(key), int | float | type(None)) for r in rows)
            header = _header(key, eps)
            table.add_column(header, justify="right" if numeric else "left", min_width=len(header))
        for row in rows:
            table.add_row(*(_compact(row.get(k)) for k in part))
        tables.append(table)
    if len(keys) < len(every):
        tables[-1].caption = "95% intervals, paired tests: reports/index.html"
    return tables


def print_results(report: dict, *, report_eps: float) -> None:
    for table in results_tables(report["table"], report_eps=report_eps):
        out.print(table)
    ml = report["mlflow"]
    out.print(f"MLflow run {ml['parent']} in {escape(redact(ml['tracking_uri']))}")
    if report.get("html"):
        out.print(f"Report: {report['html']}")
    if ml["tracking_uri"].startswith(("http://", "https://")):
        out.print(f"MLflow UI: {escape(redact(ml['tracking_uri']))}", highlight=False)
    else:
        out.print("Open the MLflow UI with: [bold]transferlab ui[/bold] [--port P]")


@app.command(
    epilog=_examples("transferlab compare", "transferlab compare --last 10"),
)
def compare(
    params: ParamsOpt = DEFAULT_PARAMS,
    last: Annotated[int, typer.Option("--last", "-n", help="how many pipeline runs", min=1)] = 5,
    verbose: VerboseOpt = False,
):
    """Table of the last pipeline runs from MLflow: method, accuracy, robust accuracy, time.

    Robust accuracy is at attack.report_eps.

    Reads: the MLflow store (tracking.tracking_uri).

    Writes: nothing.
    """
    from transferlab.tracking import recent_runs

    rows = recent_runs(_setup(params, verbose, True), Path.cwd(), last=last)
    if not rows:
        out.print("No runs yet: run [bold]transferlab run[/bold] first.")
        return
    out.print(_table(f"last {last} pipeline runs", rows))


@app.command(epilog=_examples("transferlab status"))
def status(params: ParamsOpt = DEFAULT_PARAMS, verbose: VerboseOpt = False):
    """Which stages are up to date or stale (dvc status), the feature cache, and the last runs.

    Reads: dvc.yaml and dvc.lock (through `dvc status`), the feature cache folder, the MLflow
    store.

    Writes: nothing.
    """
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


@app.command(epilog=_examples("transferlab ui", "transferlab ui --port 5001"))
def ui(
    params: ParamsOpt = DEFAULT_PARAMS,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 5000,
):
    """Start the MLflow UI on this workspace's tracking store and print its links (Ctrl-C stops
    it and every process it started).

    With an HTTP tracking store (MLFLOW_TRACKING_URI=http://...), that server is the UI: its
    address is printed and nothing is started. Exits 1 if the port is busy.

    Reads: the MLflow store (tracking.tracking_uri, tracking.artifact_dir).

    Writes: nothing; it serves http://HOST:PORT until stopped.
    """
    from transferlab.procgroup import PortBusy, check_port_free, run_group
    from transferlab.tracking import UI_ENV, tracking_uri, ui_command

    loaded = _setup(params, False, True)
    root = Path.cwd()
    uri = tracking_uri(loaded, root)
    if uri.startswith(("http://", "https://")):
        out.print(f"MLflow UI: [bold]{uri}[/bold]  (the tracking server serves it)")
        _print_ui_links(uri, root, loaded)
        return
    try:
        check_port_free(host, port)
    except PortBusy as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    base = f"http://{host}:{port}"
    out.print(f"MLflow UI: [bold]{base}[/bold]  (Ctrl-C to stop)", highlight=False)
    _print_ui_links(base, root, loaded)
    raise typer.Exit(run_group(ui_command(loaded, root, host=host, port=port), env=UI_ENV))


def _print_ui_links(base: str, root: Path, params) -> None:
    """The last pipeline run, its robustness comparison and the HTML report, linked into the
    UI at ``base``."""
    import json as _json

    from transferlab.report import series_key
    from transferlab.tracking import comparison_url, experiment_url

    results = root / "reports" / "results.json"
    if not results.is_file():
        return
    ml = _json.loads(results.read_text()).get("mlflow", {})
    exp = ml.get("experiment_id")
    if exp:
        out.print(f"experiment: {experiment_url(base, exp)}", highlight=False, soft_wrap=True)
    if exp and ml.get("parent"):
        run = f"{base}/#/experiments/{exp}/runs/{ml['parent']}"
        out.print(f"last pipeline run: {run}", highlight=False, soft_wrap=True)
        methods = [ml[m] for m in params.attack.models if m in ml]
        keys = [series_key(a) for a in params.attack.attacks]
        if methods and keys:
            url = comparison_url(base, exp, methods, keys)
            out.print(f"robust accuracy vs eps: {url}", highlight=False, soft_wrap=True)
    report = root / "reports" / "index.html"
    if report.is_file():
        out.print(
            f"report: {report.resolve().as_uri()}?mlflow={base}", highlight=False, soft_wrap=True
        )


def _reflow_help(group: typer.Typer) -> None:
    """Docstrings become help through :func:`_help` (commands that pass ``help=`` keep it)."""
    for info in group.registered_commands:
        if info.help is None and info.callback is not None and info.callback.__doc__:
            info.help = _help(info.callback.__doc__)
    for sub in group.registered_groups:
        _reflow_help(sub.typer_instance)


_reflow_help(app)


def _terminate(signum, frame):  # noqa: ARG001 - signal handler signature
    # Turn SIGTERM into an exception so context managers close: temp files are removed and an
    # open MLflow run is marked KILLED instead of being left RUNNING.
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def _interrupted(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt (Ctrl-C or our SIGTERM) is anywhere in the cause chain."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _error(text: str, hint: str = "") -> None:
    """The one ``error:`` line: credentials in URLs masked, and the text printed literally
    (rich would read ``/data/[train]`` as markup and drop the brackets)."""
    err.print(f"[red]error:[/red] {escape(redact(text))}{hint}", highlight=False, soft_wrap=True)


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
        _error(str(exc))
        sys.exit(2)
    except (click.exceptions.Exit, typer.Exit) as exc:
        sys.exit(exc.exit_code)
    except (click.ClickException, typer.TyperException) as exc:
        # typer vendors its own click: its usage errors (an unknown option, a bad --eps, no
        # command at all) derive from typer.TyperException, not from click's ClickException
        if hasattr(exc, "show"):
            exc.show()
        else:
            _error(str(exc))
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt):
        err.print("interrupted: finished outputs are kept; re-run to continue")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence for a CLI
        if _interrupted(exc):
            # A signal that landed inside an import or a library call can come back wrapped
            # (e.g. a RuntimeError whose cause is our KeyboardInterrupt): still an interruption.
            err.print("interrupted: finished outputs are kept; re-run to continue")
            sys.exit(130)
        if _verbose:
            err.print(redact(traceback.format_exc()), markup=False, highlight=False)
        _error(f"{type(exc).__name__}: {exc}", "  (re-run with --verbose for the traceback)")
        sys.exit(1)


if __name__ == "__main__":
    main()
