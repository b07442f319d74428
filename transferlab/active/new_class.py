"""A category the trained models never saw: what adding it costs the old classes.

``transferlab experiment new-class`` takes the workspace's data (``features/features.npz`` +
``data/split.csv``: the old classes) and a folder of images of one new class. The new images pass
pull's checks; their features come through the cache (only they are extracted; the old ones are
read from ``features.npz``). Then, for k new training images (``new_class.counts``, drawn per
seed) and every learner on the frozen features (svm, top), the learner is retrained on the old
training images plus the k new ones, and scored on the old test images (old-class accuracy, before
and after, paired by McNemar on the same images) and on held-out new-class images.

The methods that fine-tune their backbone (``full``, ``adv``: ``trains_backbone`` in the method
registry) follow ``new_class.fine_tuned``. ``extend``: the stored model's head gains a row
initialised from the new class's mean feature (through its own backbone, scaled to the old
rows' norm, bias = the old biases' mean), then the head alone is fine-tuned briefly
(``new_class.extend_epochs``) on the old training images plus the new ones. ``retrain``: the
method's own stage runs from scratch on a scratch workspace holding the old split plus the k new
training images (with the methods it starts from, e.g. ``adv`` from ``full``). In the pipeline
the same choice is ``label import --new-class`` then ``dvc repro`` (a retrain), which also
registers new model versions tagged with the data version (``data.dvc_hash``) that added the
class (``transferlab lineage`` lists it under ``classes_added``).
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from transferlab.config import Params
from transferlab.progress import progress
from transferlab.stats import mcnemar, wilson

log = logging.getLogger(__name__)

COMMAND = "transferlab experiment new-class --params params.yaml"


def _new_images(params: Params, root: Path) -> tuple[list[dict], list[dict]]:
    """The new class's usable images (rows with path, sha256) and the rejected ones."""
    from transferlab.active.suggest import check_candidates, list_unlabelled
    from transferlab.data.sources import TUXPAINT_SKIP_NAME_PARTS

    # mirrored copies would be near-duplicates across the new class's train and test images
    paths = [
        p
        for p in list_unlabelled(params.new_class.path)
        if not any(part in p.stem for part in TUXPAINT_SKIP_NAME_PARTS)
    ]
    ok, rejected = check_candidates(paths, params, root)
    return [{"path": str(c.path), "sha256": c.sha256} for c in ok], rejected


def extend_head(head: nn.Linear, mean_feature: torch.Tensor) -> nn.Linear:
    """A linear head with one more output: the new row points along the class's mean feature,
    scaled to the mean norm of the old rows; its bias is the old biases' mean.

    Args:
        head: (C, D) linear head. mean_feature: (D,) mean feature of the new class's images.

    Returns:
        A (C + 1, D) linear head; the first C rows equal ``head``'s.
    """
    w, b = head.weight.detach(), head.bias.detach()
    row = mean_feature / mean_feature.norm().clamp_min(1e-12) * w.norm(dim=1).mean()
    out = nn.Linear(w.shape[1], w.shape[0] + 1)
    with torch.no_grad():
        out.weight.copy_(torch.cat([w, row[None]]))
        out.bias.copy_(torch.cat([b, b.mean()[None]]))
    return out


def _fit(learner, x, y, n_classes, params: Params, seed: int):
    from transferlab.active.experiment import fit_predict

    svm = params.svm
    top = params.top.model_copy(update={"augment": False})

    def predict_on(*queries):
        scores = fit_predict(
            learner, x, y, list(queries), n_classes=n_classes, svm=svm, top=top, seed=seed
        )
        return [s.argmax(1) for s in scores]

    return predict_on


def _split_head(head: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(body, last linear layer) of a head: a linear head has an empty body; an MLP ends in one."""
    if isinstance(head, nn.Linear):
        return nn.Identity(), head
    if isinstance(head, nn.Sequential) and isinstance(head[-1], nn.Linear):
        return head[:-1], head[-1]
    raise ValueError(f"cannot extend a head of type {type(head).__name__}: no final linear layer")


def extend_any_head(head: nn.Module, new_features: torch.Tensor) -> nn.Module:
    """``head`` with one more output, its row from the mean of ``new_features`` (N, D) as they
    reach the last linear layer (through an MLP head's hidden layers)."""
    body, last = _split_head(head)
    with torch.no_grad():
        mean = body.eval()(new_features).mean(0)
    wider = extend_head(last, mean)
    return wider if isinstance(head, nn.Linear) else nn.Sequential(*body, wider)


def _head_finetune(head: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float):
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(32):
            loss = nn.functional.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval()


def _images(paths: list[Path], spec, background) -> torch.Tensor:
    """(N, 3, S, S) images in [0, 1] as every model takes them (the backbone's resize + crop)."""
    from transferlab.features import load_images

    chunks = [
        load_images(paths[i : i + 32], spec, background=background)
        for i in range(0, len(paths), 32)
    ]
    s = spec.input_size
    return torch.cat(chunks) if chunks else torch.zeros(0, 3, s, s)


def _old_and_new_images(params: Params, root: Path, new_rows: list[dict], spec):
    """The old split's rows, their images and the new class's images (decoded once)."""
    from transferlab.layout import split_rows

    bg = tuple(params.data.background)
    old = split_rows(root)
    x_old = _images([root / "data" / r["path"] for r in old], spec, bg)
    x_new = _images([Path(r["path"]) for r in new_rows], spec, bg)
    return old, x_old, x_new


@torch.no_grad()
def _embed(clf, x: torch.Tensor) -> torch.Tensor:
    """What ``clf``'s head sees: its backbone's features of ``x`` at its own input size."""
    from transferlab.classifiers.training import resize_to

    clf.eval()
    return torch.cat(
        [
            clf.backbone.features(resize_to(x[i : i + 16], clf.input_size))
            for i in range(0, len(x), 16)
        ]
    )


def _extend(params: Params, root: Path, name: str, images, train_pool, test_idx) -> list[dict]:
    """Extend ``models/<name>``'s head by the new class and fine-tune the head briefly."""
    from transferlab.classifiers import load_classifier

    nc = params.new_class
    old, x_old, x_new = images
    clf = load_classifier(root / "models" / name)
    classes = list(clf.classes)
    keep = [i for i, r in enumerate(old) if r["split"] in ("train", "test")]
    f_old, f_new = _embed(clf, x_old[keep]), _embed(clf, x_new)
    y_old = torch.tensor([classes.index(old[i]["label"]) for i in keep])
    is_test = torch.tensor([old[i]["split"] == "test" for i in keep])
    new_label = len(classes)
    with torch.no_grad():
        before = (clf.head(f_old[is_test]).argmax(1) == y_old[is_test]).numpy()
    lr = getattr(params, name).lr
    rows = []
    for k in nc.counts:
        for seed in nc.seeds:
            pick = np.random.default_rng(seed).permutation(train_pool)[:k]
            head = extend_any_head(copy.deepcopy(clf.head), f_new[pick])
            x = torch.cat([f_old[~is_test], f_new[pick]])
            y = torch.cat([y_old[~is_test], torch.full((k,), new_label)])
            t = time.perf_counter()
            head = _head_finetune(head.train(), x, y, epochs=nc.extend_epochs, lr=lr)
            secs = time.perf_counter() - t
            with torch.no_grad():
                after = (head(f_old[is_test]).argmax(1) == y_old[is_test]).numpy()
                new_ok = (head(f_new[test_idx]).argmax(1) == new_label).numpy()
            rows.append(_row(name, k, seed, before, after, new_ok, secs))
    return rows


def _scratch_workspace(root: Path, old_rows, new_rows, pick, test_idx, name: str) -> Path:
    """A workspace whose split is the old one plus the ``pick`` new images (train) and the new
    class's held-out images (test); the old images are linked, not copied."""
    import tempfile

    from transferlab.layout import MANIFEST, SPLIT
    from transferlab.stages import write_csv

    (root / ".transferlab").mkdir(exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="new-class-", dir=root / ".transferlab"))
    (scratch / "data").mkdir()
    (scratch / "data" / "images").symlink_to((root / "data" / "images").resolve())
    shutil.copyfile(root / MANIFEST, scratch / MANIFEST)  # the stages' fingerprints read it
    added = [(int(i), "train") for i in pick] + [(int(i), "test") for i in test_idx]
    rows = [dict(r) for r in old_rows] + [
        {"path": new_rows[i]["path"], "label": name, "sha256": new_rows[i]["sha256"], "split": part}
        for i, part in added
    ]
    write_csv(scratch / SPLIT, rows)
    return scratch


def _with_starts(names: list[str]) -> list[str]:
    """``names`` plus the methods their stages start from (``Method.after``), in registry
    order, so each starting model is trained before the method that reads it."""
    from transferlab.methods import METHODS

    needed, queue = set(names), list(names)
    while queue:
        for dep in METHODS[queue.pop()].after:
            if dep not in needed:
                needed.add(dep)
                queue.append(dep)
    return [m for m in METHODS if m in needed]


def _retrain(params: Params, root: Path, names: list[str], images, new_rows, train_pool, test_idx):
    """Each method's own stage, from scratch, on the old split plus k new training images."""
    from transferlab.classifiers import load_classifier
    from transferlab.classifiers.training import predict
    from transferlab.methods import METHODS

    nc = params.new_class
    old, x_old, x_new = images
    is_test = torch.tensor([r["split"] == "test" for r in old])
    x_test, x_new_test = x_old[is_test], x_new[torch.as_tensor(test_idx, dtype=torch.long)]
    truth = np.array([r["label"] for r in old if r["split"] == "test"])
    before = {}
    for name in names:
        clf = load_classifier(root / "models" / name)
        before[name] = np.array(clf.classes)[predict(clf, x_test)] == truth
    rows = []
    for k in nc.counts:
        for seed in nc.seeds:
            pick = np.random.default_rng(seed).permutation(train_pool)[:k]
            scratch = _scratch_workspace(root, old, new_rows, pick, test_idx, nc.name)
            try:
                seconds = {}
                for m in _with_starts(names):
                    t = time.perf_counter()
                    METHODS[m].stage()(params, scratch)
                    seconds[m] = time.perf_counter() - t
                for name in names:
                    clf = load_classifier(scratch / "models" / name)
                    labels = np.array(clf.classes)
                    after = labels[predict(clf, x_test)] == truth
                    new_ok = labels[predict(clf, x_new_test)] == nc.name
                    rows.append(_row(name, k, seed, before[name], after, new_ok, seconds[name]))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    return rows


def _fine_tuned(params: Params, root: Path, new_rows, train_pool, test_idx, notes: dict):
    """Rows for the learners that fine-tune their backbone (``new_class.fine_tuned``); a
    learner without a stored model is skipped, with the reason in ``notes``."""
    from transferlab.methods import METHODS

    nc = params.new_class
    names = []
    for name in (m for m in nc.learners if METHODS[m].trains_backbone):
        if (root / "models" / name / "meta.json").exists():
            names.append(name)
        else:
            notes[name] = f"skipped: no models/{name} here (run `transferlab {name}` first)"
            log.warning("new class: %s", notes[name])
    if not names:
        return []
    from transferlab.backbones import load_backbone

    spec = load_backbone(params.features.backbone, params.features.pretrained).spec
    images = _old_and_new_images(params, root, new_rows, spec)
    if nc.fine_tuned == "retrain":
        notes.update({n: "retrained from scratch by its own stage" for n in names})
        return _retrain(params, root, names, images, new_rows, train_pool, test_idx)
    rows = []
    for name in names:
        notes[name] = f"head extended, then {nc.extend_epochs} head-only epochs"
        rows += _extend(params, root, name, images, train_pool, test_idx)
    return rows


def _row(learner, k, seed, before, after, new_ok, seconds) -> dict:
    paired = mcnemar(after, before)
    return {
        "learner": learner,
        "k": int(k),
        "seed": int(seed),
        "old_acc_before": float(before.mean()),
        "old_acc_after": float(after.mean()),
        "old_n": int(len(before)),
        "old_correct_before": int(before.sum()),
        "old_correct_after": int(after.sum()),
        "mcnemar_p": paired.p_value,
        "new_acc": float(new_ok.mean()) if len(new_ok) else None,
        "new_n": int(len(new_ok)),
        "new_correct": int(new_ok.sum()),
        "retrain_seconds": round(seconds, 3),
    }


def new_class_experiment(params: Params, root: Path) -> dict:
    """Run the measurement (module docstring); write ``<out_dir>/{runs.csv,summary.json,
    summary.md,new_class.png}``."""
    from transferlab.layout import labelled_features
    from transferlab.methods import METHODS
    from transferlab.stages import _extract_rows, write_csv, write_json

    nc = params.new_class
    start = time.perf_counter()
    data, classes = labelled_features(root)
    if nc.name in classes:
        raise ValueError(
            f"new_class.name {nc.name!r} is already a class of this workspace; choose a class "
            f"the models have not seen"
        )
    new_rows, rejected = _new_images(params, root)
    if len(new_rows) < max(nc.counts) + 1:
        raise ValueError(
            f"new_class.path {nc.path} has {len(new_rows)} usable images; need more than "
            f"max(new_class.counts) = {max(nc.counts)} (the rest are its test images)"
        )
    t = time.perf_counter()
    f_new, stats = _extract_rows(params, root, new_rows, record=False)
    extract_seconds = time.perf_counter() - t
    order = np.random.default_rng(12345).permutation(len(new_rows))
    train_pool, test_idx = order[: max(nc.counts)], order[max(nc.counts) :][: nc.test_max]
    n_old = len(classes)
    x_tr, y_tr = data["x_train"].astype(np.float32), data["y_train"]
    x_te, y_te = data["x_test"].astype(np.float32), data["y_test"]
    f_new = f_new.astype(np.float32)
    rows: list[dict] = []
    learners = [m for m in nc.learners if not METHODS[m].trains_backbone]
    jobs = [(ln, k, s) for ln in learners for k in nc.counts for s in nc.seeds]
    with progress(desc="new class", unit="fit", total=len(jobs) + len(learners)) as bar:
        for ln in learners:
            (pred_before,) = _fit(ln, x_tr, y_tr, n_old, params, 0)(x_te)
            bar.update()
            before = pred_before == y_te
            for _, k, seed in (j for j in jobs if j[0] == ln):
                pick = np.random.default_rng(seed).permutation(train_pool)[:k]
                x = np.concatenate([x_tr, f_new[pick]])
                y = np.concatenate([y_tr, np.full(k, n_old)])
                t = time.perf_counter()
                p_old, p_new = _fit(ln, x, y, n_old + 1, params, seed)(x_te, f_new[test_idx])
                secs = time.perf_counter() - t
                rows.append(_row(ln, k, seed, before, p_old == y_te, p_new == n_old, secs))
                bar.update()
    notes: dict[str, str] = {}
    rows += _fine_tuned(params, root, new_rows, train_pool, test_idx, notes)
    summary = _summarise(rows)
    out = root / nc.out_dir
    meta = {
        "new_class": nc.name,
        "old_classes": classes,
        "new_images": len(new_rows),
        "new_rejected": rejected,
        "new_test_images": int(len(test_idx)),
        "features_extracted": stats.misses,
        "features_cached": stats.hits,
        "extract_seconds": round(extract_seconds, 2),
        "fine_tuned": nc.fine_tuned,
        "fine_tuned_notes": notes,
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_csv(out / "runs.csv", rows)
    write_json(out / "summary.json", {**meta, "summary": summary})
    from transferlab.atomic import atomic_write

    with atomic_write(out / "summary.md", "w", encoding="utf-8") as f:
        f.write(_markdown(summary, meta))
    png = _plot(summary, out / "new_class.png")
    return {**{k: v for k, v in meta.items() if k != "new_rejected"}, "plot": str(png)}


def _summarise(rows: list[dict]) -> list[dict]:
    """Per (learner, k): old-class accuracy before/after (Wilson 95%), the paired McNemar p of
    the first seed, new-class accuracy (Wilson 95% of the pooled seeds), retrain time."""
    out = []
    for ln in dict.fromkeys(r["learner"] for r in rows):
        for k in sorted({r["k"] for r in rows if r["learner"] == ln}):
            at = [r for r in rows if r["learner"] == ln and r["k"] == k]
            n = at[0]["old_n"]
            before = at[0]["old_correct_before"]
            after = float(np.mean([r["old_correct_after"] for r in at]))
            new_n = sum(r["new_n"] for r in at)
            new_k = sum(r["new_correct"] for r in at)
            out.append(
                {
                    "learner": ln,
                    "k": k,
                    "old_acc_before": before / n,
                    "old_before_ci": wilson(before, n),
                    "old_acc_after": after / n,
                    "old_after_ci": wilson(round(after), n),
                    "old_drop": (before - after) / n,
                    "drop_within_interval": (before - after) / n
                    <= (before / n - wilson(before, n)[0]),
                    "mcnemar_p_seed0": at[0]["mcnemar_p"],
                    "new_acc": new_k / new_n if new_n else None,
                    "new_ci": wilson(new_k, new_n),
                    "retrain_seconds": float(np.mean([r["retrain_seconds"] for r in at])),
                    "seeds": len(at),
                }
            )
    return out


def _markdown(summary: list[dict], meta: dict) -> str:
    lines = [
        f"# A new category: `{meta['new_class']}` added to {', '.join(meta['old_classes'])}",
        "",
        f"Reproduce with:\n\n```\n{COMMAND}\n```\n",
        f"{meta['new_images']} usable new images ({len(meta['new_rejected'])} rejected); "
        f"{meta['new_test_images']} held out as the new class's test set. Features extracted for "
        f"{meta['features_extracted']} new images ({meta['features_cached']} from the cache) in "
        f"{meta['extract_seconds']} s; the old images' features were not extracted again. "
        f"Methods that fine-tune their backbone (new_class.fine_tuned: {meta['fine_tuned']}): "
        + ("; ".join(f"{k}: {v}" for k, v in meta["fine_tuned_notes"].items()) or "none listed")
        + f". Ran in {meta['seconds']} s.",
        "",
        "Old-class accuracy is on the old test images (the same images before and after; "
        "Wilson 95% intervals; McNemar mid-p of seed 0, paired). The drop is within the interval "
        "when it is no larger than the before-interval's lower half-width.",
        "",
        "| learner | k new images | old acc before | old acc after | drop | within interval | "
        "McNemar p | new-class acc | retrain s |",
        "|:--|--:|:--|:--|--:|:--|--:|:--|--:|",
    ]
    for s in summary:
        b, a, nw = s["old_before_ci"], s["old_after_ci"], s["new_ci"]
        new = "-" if s["new_acc"] is None else f"{s['new_acc']:.3f} [{nw[0]:.3f}, {nw[1]:.3f}]"
        lines.append(
            f"| {s['learner']} | {s['k']} | {s['old_acc_before']:.3f} [{b[0]:.3f}, {b[1]:.3f}] | "
            f"{s['old_acc_after']:.3f} [{a[0]:.3f}, {a[1]:.3f}] | {s['old_drop']:+.3f} | "
            f"{'yes' if s['drop_within_interval'] else 'no'} | {s['mcnemar_p_seed0']:.2f} | "
            f"{new} | {s['retrain_seconds']:.2f} |"
        )
    lines += ["", "![old and new class accuracy against new images](new_class.png)", ""]
    return "\n".join(lines)


def _plot(summary: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from transferlab.report import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for ln in dict.fromkeys(s["learner"] for s in summary):
        pts = [s for s in summary if s["learner"] == ln]
        ks = [s["k"] for s in pts]
        (line,) = axes[0].plot(ks, [s["old_acc_after"] for s in pts], marker="o", label=ln)
        axes[0].axhline(pts[0]["old_acc_before"], color=line.get_color(), ls=":", lw=1)
        axes[0].fill_between(
            ks,
            [s["old_after_ci"][0] for s in pts],
            [s["old_after_ci"][1] for s in pts],
            color=line.get_color(),
            alpha=0.12,
        )
        axes[1].errorbar(
            ks,
            [s["new_acc"] for s in pts],
            yerr=[
                [s["new_acc"] - s["new_ci"][0] for s in pts],
                [s["new_ci"][1] - s["new_acc"] for s in pts],
            ],
            marker="o",
            capsize=3,
            label=ln,
        )
    axes[0].set_title("old classes (dotted: before)")
    axes[1].set_title("new class (held-out images)")
    for ax in axes:
        ax.set_xlabel("new-class training images")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return save_figure(fig, out)
