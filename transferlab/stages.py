"""One function per pipeline stage: the only implementation, called by the CLI (and so by
``dvc repro``) and by the Prefect tasks alike.

Stages talk through files under a workspace folder, at the paths that ``STAGES`` declares and
``dvc.yaml`` mirrors. Each returns a small JSON-able summary.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferlab.atomic import atomic_write, write_json  # noqa: F401
from transferlab.config import Params
from transferlab.eps import Eps
from transferlab.layout import (  # noqa: F401  (the workspace's files, re-exported)
    CONFUSION_DIR,
    FEATURES,
    IMAGES,
    LABELLED_DIR,
    MANIFEST,
    REJECTED,
    SPLIT,
    split_rows,
)
from transferlab.methods import METHODS

log = logging.getLogger(__name__)


ATTACK_METRICS = "metrics/attack.json"
ROBUSTNESS_CSV = "plots/robustness.csv"
ROBUSTNESS_PNG = "plots/robustness.png"
TRANSFER_METRICS = "metrics/transfer.json"
TRANSFER_PNG = "plots/transfer.png"
ADVERSARIAL_PNG = "plots/adversarial_examples.png"
RESULTS = "reports/results.json"
REPORT_HTML = "reports/index.html"
GATE = "reports/gate.json"


def write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def read_json(path: Path) -> dict:
    """A stage output; a corrupt one names itself (FileNotFoundError stays as it is)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{path} is corrupt ({str(exc)[:120]}); delete it and re-run the stage that writes it"
        ) from None


# ------------------------------------------------------------------ stages


def pull(params: Params, root: Path) -> dict:
    """Validate the source's images and copy them under ``data/`` with a manifest."""
    from transferlab.data import pull_dataset
    from transferlab.data.split import min_class_size

    # Only to warn early about classes the split will refuse; the outputs do not depend on it.
    need = min_class_size(val=params.split.val, test=params.split.test)
    result = pull_dataset(
        params.data, root / "data", min_per_class=need, labelled=root / LABELLED_DIR
    )
    return {"kept": result.kept, "rejected": result.n_rejected}


def split(params: Params, root: Path) -> dict:
    """Stratified, seeded train/val/test split of the manifest."""
    from transferlab.data import split_manifest

    return split_manifest(root / MANIFEST, params.split, root / SPLIT)


def _extract_rows(
    params: Params, root: Path, rows: list[dict], *, record: bool = True, backbone=None
):
    """Features for ``rows`` through the cache; a shard lands every ``features.checkpoint_every``
    new images, so a killed run resumes from the last one. ``backbone``: one the caller has
    loaded already (``label suggest`` has its scorer's), else ``features.backbone``."""
    from transferlab.backbones import load_backbone
    from transferlab.features import extract_features

    fp = params.features
    return extract_features(
        backbone or load_backbone(fp.backbone, fp.pretrained),
        [root / "data" / r["path"] for r in rows],
        [r["sha256"] for r in rows],
        cache_root=root / fp.cache_dir,
        batch_size=fp.batch_size,
        num_workers=fp.num_workers,
        precision=fp.precision,
        background=params.data.background,
        compile=fp.compile,
        record=record,
        checkpoint_every=fp.checkpoint_every,
        # unlabelled rows (label suggest, new-class probes) leave precision: auto nothing to judge
        labels=labels if all(labels := [r.get("label") for r in rows]) else None,
    )


def shard_of(sha256: str, n_shards: int) -> int:
    """The shard an image belongs to: by content, so adding images never moves the others."""
    return int(sha256[:8], 16) % n_shards


def features_shard(params: Params, root: Path, shard_index: int, n_shards: int) -> dict:
    """Fill the feature cache for one shard of the manifest (what the flow maps over workers).

    ``features`` then assembles ``features/features.npz`` from the cache without extracting.
    """
    from transferlab.data import read_manifest

    if not 0 <= shard_index < n_shards:
        raise ValueError(f"shard_index {shard_index} is outside 0..{n_shards - 1}")
    rows = [
        r for r in read_manifest(root / MANIFEST) if shard_of(r["sha256"], n_shards) == shard_index
    ]
    # the flow records the hit rate summed over shards; one shard's own would mislead
    _, stats = _extract_rows(params, root, rows, record=False)
    log.info(
        "features shard %d/%d: %d images, %d from cache, %.1f s",
        shard_index,
        n_shards,
        stats.images,
        stats.hits,
        stats.seconds,
    )
    return {
        "shard": shard_index,
        "images": stats.images,
        "cache_hits": stats.hits,
        "seconds": round(stats.seconds, 3),
    }


def features(params: Params, root: Path) -> dict:
    """Frozen-backbone features for every manifest image, through the content-addressed cache."""
    from transferlab.data import read_manifest
    from transferlab.features import atomic_save_npz

    rows = read_manifest(root / MANIFEST)
    feats, stats = _extract_rows(params, root, rows)
    atomic_save_npz(
        root / FEATURES,
        features=feats,
        sha256=np.array([r["sha256"] for r in rows]),
        path=np.array([r["path"] for r in rows]),
        label=np.array([r["label"] for r in rows]),
    )
    log.info("features: %d images, %d from cache, %.1f s", stats.images, stats.hits, stats.seconds)
    return {
        "images": stats.images,
        "cache_hits": stats.hits,
        "seconds": round(stats.seconds, 3),
        "precision": stats.precision,
    }


def method_stage(name: str) -> Callable[..., dict]:
    """The stage of a registered method: its body is imported when the stage runs."""

    def run(params: Params, root: Path) -> dict:
        return METHODS[name].stage()(params, root)

    run.__name__ = run.__qualname__ = name
    run.__doc__ = METHODS[name].summary
    return run


def attack(params: Params, root: Path) -> dict:
    """Attack every model in ``attack.models`` over the eps sweep on (up to ``max_images``) test
    images, the transfer matrix, and an adversarial-example grid.

    Finished shards in ``attack.work_dir`` are reused, so a killed run resumes.
    """
    from transferlab.evaluate import attack_evidence, sanity_flags, scalar_fields
    from transferlab.gate import images_digest
    from transferlab.report import grid_pairs, plot_adversarial_grid, plot_transfer_matrix
    from transferlab.robustness import AttackSession

    ap = params.attack
    session = AttackSession(params, root)  # each model loaded, test set decoded, once
    rows: list[dict] = []
    checks: list[dict] = []
    for method in ap.models:
        model_rows, check = session.sweep(method)
        rows.extend(model_rows)
        if check:
            checks.append(check)
    flags = sanity_flags(rows)
    # the masking probes (attack.masking) feed the flags only, not the curves and tables
    rows = [r for r in rows if "probe" not in r]
    for c in checks:
        if c["bf16_fp32_agreement"] < 0.95:
            flags.append({"level": "warn", "check": "bf16 agrees with fp32 (clean)", **c})
    for f in flags:
        (log.error if f["level"] == "fail" else log.warning)("%s", _flag_sentence(f))
    summary = {
        m: {
            "clean_acc": next(r["clean_acc"] for r in rows if r["model"] == m),
            **{
                a: {
                    Eps(r["eps"]).key: r["robust_acc"]
                    for r in rows
                    if r["model"] == m and r["attack"] == a
                }
                for a in ap.attacks
            },
        }
        for m in ap.models
    }
    intervals, outcomes = attack_evidence(rows)
    rows = [scalar_fields(r) for r in rows]
    # `series` colours one line per model/attack in `dvc plots show` (dvc_plots/robustness.json)
    write_csv(
        root / ROBUSTNESS_CSV,
        [
            {**r, "eps_255": round(r["eps"] * 255, 4), "series": f"{r['model']}/{r['attack']}"}
            for r in rows
        ],
    )

    t_rows, _, _ = session.transfer()
    write_json(root / TRANSFER_METRICS, {"matrix": t_rows})
    plot_transfer_matrix(t_rows, root / TRANSFER_PNG)
    # one example per model and attack (the same test image, so rows compare), up to
    # attack.grid_images rows, every model and attack among them
    pairs = grid_pairs(list(ap.models), list(ap.attacks), ap.grid_images)
    examples = [ex for m, a in pairs for ex in session.grid(m, a, ap.report_eps, n=1)]
    plot_adversarial_grid(examples, root / ADVERSARIAL_PNG)
    write_json(
        root / ATTACK_METRICS,
        {
            "summary": summary,
            "intervals": intervals,
            "outcomes": outcomes,
            # names the attacked images, so a later gate run knows whether it can pair them
            "images": images_digest(
                [r["sha256"] for r in split_rows(root) if r["split"] == "test"][: ap.max_images]
            ),
            "sanity": flags,
            "precision": checks,
            # the grid's rows (at report_eps), so the HTML report can say what it shows
            "grid": [{"model": m, "attack": a} for m, a in pairs],
        },
    )
    return {
        "rows": len(rows),
        "transfer_pairs": len(t_rows),
        "sanity_failures": sum(f["level"] == "fail" for f in flags),
        "sanity_warnings": sum(f["level"] == "warn" for f in flags),
    }


def _read_robustness(root: Path) -> list[dict]:
    with open(root / ROBUSTNESS_CSV, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    numeric = ("eps", "robust_acc", "clean_acc", "success_rate", "linf_mean", "l2_mean", "seconds")
    numeric += ("clean_acc_ci_low", "clean_acc_ci_high", "robust_acc_ci_low", "robust_acc_ci_high")
    for r in rows:
        for k in numeric:
            if k in r:  # a CSV from before the intervals lacks the *_ci_* columns
                r[k] = float(r[k])
    return rows


def report(params: Params, root: Path, *, context: dict[str, str] | None = None) -> dict:
    """Plots, the results table, and one MLflow run (nested per method) with the lineage."""
    from transferlab.classifiers import load_classifier
    from transferlab.data import manifest_hash
    from transferlab.data.version import data_version_tags
    from transferlab.html_report import write_html_report
    from transferlab.method_report import method_record
    from transferlab.report import attach_robustness, plot_robustness, results_table
    from transferlab.tracking import (
        MethodRecord,
        check_tracking_store,
        git_state,
        log_pipeline_run,
    )

    check_tracking_store(params, root)
    rows = _read_robustness(root)
    plot = plot_robustness(rows, root / ROBUSTNESS_PNG)
    metrics_by_method = {name: read_json(root / m.metrics_file) for name, m in METHODS.items()}
    table = results_table(metrics_by_method, rows, params.attack.report_eps)

    records = []
    for name, method in METHODS.items():
        record = method_record(
            name,
            metrics_by_method[name],
            load_classifier(root / method.model_dir),
            metrics_file=root / method.metrics_file,
            confusion_png=root / CONFUSION_DIR / f"{name}.png",
            experiment=params.tracking.experiment,
        )
        record.model_dir = root / method.model_dir
        # one series per attack with every eps as a step, so the MLflow UI charts it (x = eps*255)
        attach_robustness(record, rows, report_eps=params.attack.report_eps)
        record.params["attack.eps_values"] = ",".join(f"{e:.6g}" for e in params.attack.eps)
        records.append(record)
    eps_values = ",".join(f"{e:.6g}" for e in params.attack.eps)
    # attacked models without a method record of their own (e.g. the ImageNet model)
    for m in dict.fromkeys(r["model"] for r in rows):
        if m not in {rec.name for rec in records}:
            extra = MethodRecord(name=m, params={"attack.eps_values": eps_values})
            attach_robustness(extra, rows, report_eps=params.attack.report_eps)
            records.append(extra)
    attack_plots = [root / p for p in (TRANSFER_PNG, ADVERSARIAL_PNG, TRANSFER_METRICS)]
    tags = {
        **git_state(root),
        "params.hash": params.section_hash(),
        "data.manifest_hash": manifest_hash(root / MANIFEST),
        **data_version_tags(root),
        **(context or {}),
    }
    ids = log_pipeline_run(
        params,
        root,
        tags=tags,
        methods=records,
        artifacts=[plot, root / ROBUSTNESS_CSV, *(p for p in attack_plots if p.exists())],
    )
    ship = _what_to_ship(params, root, metrics_by_method)
    write_json(root / RESULTS, {"table": table, "ship": ship, "mlflow": ids, "tags": tags})
    write_html_report(root, root / REPORT_HTML, title=f"transferlab: {params.tracking.experiment}")
    return {"table": table, "mlflow": ids, "html": str(root / REPORT_HTML)}


def _flag_sentence(flag: dict) -> str:
    """A sanity flag as a log sentence, e.g. "Sanity check failed: robust <= clean (svm, pgd at
    eps 4/255)." ("warn" and "note" flags read "needs a look")."""
    where = [str(flag[k]) for k in ("model", "attack") if k in flag]
    if isinstance(flag.get("eps"), int | float):
        where.append(f"at eps {Eps(flag['eps']).label}")
    verdict = "failed" if flag["level"] == "fail" else "needs a look"
    detail = f" ({', '.join(where)})" if where else ""
    return f"Sanity check {verdict}: {flag['check']}{detail}."


def _what_to_ship(params: Params, root: Path, metrics_by_method: dict[str, dict]) -> dict:
    """The report's verdict (``transferlab.verdict``) and the gate's decision for each attacked
    method against its current champion, under the gate's (strongest) attack."""
    from transferlab.gate import decide, gate_metrics
    from transferlab.tracking import champion_of
    from transferlab.verdict import what_to_ship

    attack_json = read_json(root / ATTACK_METRICS)
    ship = what_to_ship(metrics_by_method, attack_json, params.gate)
    ship["gate"] = {}
    for method in params.attack.models:
        if method not in metrics_by_method:
            continue  # e.g. the ImageNet model: nothing is registered for it
        candidate = gate_metrics(attack_json, method, params.gate.attack, params.gate.eps)
        version, champion = champion_of(params, root, method)
        decision = decide(candidate, champion, params.gate)
        ship["gate"][method] = {
            "decision": decision.decision,
            "reasons": list(decision.reasons),
            "champion_version": version,
            "judged_under": candidate.attack,
        }
    return ship


def gate(params: Params, root: Path, *, context: dict[str, str] | None = None) -> dict:
    """The robustness regression gate: promote each method's new version to the champion alias
    only if its clean and robust accuracy clear ``params.gate`` (see ``transferlab.gate``).

    Every run records the decision; only the scheduled deployment's run or a person's
    ``transferlab gate`` moves the alias (``lineage.may_move_champion``), so ``dvc repro``,
    ``dvc exp run`` and ad-hoc ``transferlab run`` never change what is served.
    """
    from transferlab.gate import gate_metrics
    from transferlab.lineage import may_move_champion
    from transferlab.tracking import apply_gate

    results = read_json(root / RESULTS)
    attack_json = read_json(root / ATTACK_METRICS)
    gp = params.gate
    decisions = {}
    for method in params.attack.models:
        version = results["mlflow"].get(f"model_version.{method}")
        if version is None:
            log.warning("gate: no registered version of %s in %s; skipped", method, RESULTS)
            continue
        candidate = gate_metrics(attack_json, method, gp.attack, gp.eps)
        decisions[method] = apply_gate(
            params, root, method, version, candidate, move_alias=may_move_champion(context)
        )
    write_json(root / GATE, decisions)
    return {m: d["decision"] for m, d in decisions.items()}


def attack_registered(params: Params, root: Path, *, model: str) -> dict:
    """Attack a registered model version (``NAME@alias`` or ``NAME/version``) on the workspace's
    test split over ``params.attack`` (attacks, eps), and log the result as an MLflow run.

    Not part of the DAG (its input is a registry entry, not a file): the ``attack-eval``
    deployment and ``transferlab attack-eval`` call it.
    """
    from transferlab.evaluate import robustness_sweep
    from transferlab.robustness import load_test_images
    from transferlab.tracking import load_registered_model, log_attack_eval

    ap = params.attack
    clf, mv = load_registered_model(params, root, model)
    x, y = load_test_images(params, root, list(clf.classes))
    rows = robustness_sweep(clf, x, y, attacks=ap.attacks, eps=ap.eps, batch_size=ap.batch_size)
    metrics = {
        "clean_acc": rows[0]["clean_acc"],
        "clean_acc_ci_low": rows[0]["clean_acc_ci_low"],
        "clean_acc_ci_high": rows[0]["clean_acc_ci_high"],
        "n_images": float(len(y)),
    }
    for r in rows:
        key = Eps(r["eps"]).metric(r["attack"])
        metrics[key] = r["robust_acc"]
        metrics[f"{key}_ci_low"] = r["robust_acc_ci_low"]
        metrics[f"{key}_ci_high"] = r["robust_acc_ci_high"]
    out = root / f"metrics/attack_eval/{mv.name}-v{mv.version}.json"
    write_json(out, {"model": mv.name, "version": str(mv.version), "rows": rows})
    run_id = log_attack_eval(params, root, mv, metrics=metrics, artifacts=[out])
    return {"model": mv.name, "version": str(mv.version), "run_id": run_id, "metrics": metrics}


# ------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Stage:
    """A stage's function and its declared inputs/outputs (what dvc.yaml mirrors)."""

    name: str
    run: Callable[..., dict]
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    params: tuple[str, ...]
    metrics: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()


def _method_stage(method) -> Stage:
    """A method's stage: its inputs by what it reads, its model folder and metrics file."""
    return Stage(
        method.name,
        method_stage(method.name),
        method.deps,
        (method.model_dir,),
        method.sections,
        (method.metrics_file,),
    )


def _stages() -> dict[str, Stage]:
    attacked = tuple(m.model_dir for m in METHODS.values() if m.attackable)
    models = tuple(m.model_dir for m in METHODS.values())
    metrics = tuple(m.metrics_file for m in METHODS.values())
    stages = (
        Stage("pull", pull, (LABELLED_DIR,), (IMAGES, MANIFEST, REJECTED), ("data",)),
        Stage("split", split, (MANIFEST,), (SPLIT,), ("split",)),
        Stage("features", features, (MANIFEST, IMAGES), (FEATURES,), ("data", "features")),
        *(_method_stage(m) for m in METHODS.values()),
        Stage(
            "attack",
            attack,
            (*attacked, SPLIT, IMAGES),
            (),
            ("attack", "data", "features"),
            (ATTACK_METRICS, TRANSFER_METRICS),
            (ROBUSTNESS_CSV, TRANSFER_PNG, ADVERSARIAL_PNG),
        ),
        Stage(
            "report",
            report,
            (*metrics, ATTACK_METRICS, ROBUSTNESS_CSV, *models, MANIFEST),
            (ROBUSTNESS_PNG, RESULTS, REPORT_HTML, CONFUSION_DIR),
            ("tracking",),
        ),
        Stage("gate", gate, (RESULTS, ATTACK_METRICS), (GATE,), ("gate", "tracking")),
    )
    return {s.name: s for s in stages}


# Built from the method registry: one stage per registered method, between features and attack
STAGES: dict[str, Stage] = _stages()


def check_dvc_yaml(stages: dict) -> list[str]:
    """What in ``dvc.yaml``'s ``stages`` mapping disagrees with ``STAGES`` (empty: in step).

    Each entry runs ``transferlab <name>`` and declares exactly the stage's deps, outs, params
    sections, metrics and plots, in ``STAGES``' order.
    """

    def paths(entries) -> set[str]:
        return {e if isinstance(e, str) else next(iter(e)) for e in entries or []}

    problems = []
    if list(stages) != list(STAGES):
        problems.append(f"stages {list(stages)} != {list(STAGES)}")
    for name, stage in STAGES.items():
        spec = stages.get(name)
        if spec is None:
            continue
        if spec.get("cmd") != f"transferlab {name}":
            problems.append(f"{name}: cmd {spec.get('cmd')!r} != 'transferlab {name}'")
        declared = {
            "deps": (paths(spec.get("deps")) - {"${data.source.path}"}, set(stage.deps)),
            "outs": (paths(spec.get("outs")), set(stage.outs)),
            "params": (set(spec.get("params", [])), set(stage.params)),
            "metrics": (paths(spec.get("metrics")), set(stage.metrics)),
            "plots": (paths(spec.get("plots")), set(stage.plots)),
        }
        for key, (got, want) in declared.items():
            if got != want:
                problems.append(f"{name}: {key} {sorted(got)} != {sorted(want)}")
    return problems
