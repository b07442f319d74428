"""Sweep metrics, sanity flags, resumable shards, transfer matrix, bf16 check, attack params."""

from __future__ import annotations

import pytest
import torch
import yaml

from tests.unit.attacks.conftest import make_tiny_cnn, random_images
from transferlab.attacks import FGSM
from transferlab.attacks.transfer import transfer_matrix
from transferlab.config import AttackParams, Params, ParamsError, load_params
from transferlab.evaluate import (
    OUTCOMES,
    ShardStore,
    attack_evidence,
    robustness_sweep,
    sanity_flags,
    scalar_fields,
)
from transferlab.methods import METHODS
from transferlab.robustness import Autocast, model_digest


@pytest.fixture
def data(one_thread):
    model = make_tiny_cnn()
    x = random_images(32, torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:4] = (y[:4] + 1) % 10  # a few wrong, so clean accuracy < 1
    return model, x, y


def row(**kw) -> dict:
    base = {
        "model": "m",
        "attack": "pgd",
        "family": "whitebox",
        "eps": 0.01,
        "n": 10,
        "clean_acc": 0.9,
        "robust_acc": 0.5,
        "max_linf": 0.01,
        "model_unchanged": True,
    }
    return {**base, **kw}


def checks(rows: list[dict]) -> set[tuple[str, str]]:
    return {(f["level"], f["check"]) for f in sanity_flags(rows)}


def test_sanity_flags_fire_on_each_broken_invariant() -> None:
    assert checks([row()]) == set()
    assert ("fail", "eps=0 gives robust = clean") in checks([row(eps=0.0, max_linf=0.0)])
    assert ("fail", "perturbation within eps") in checks([row(max_linf=0.02)])
    assert ("fail", "robust <= clean") in checks([row(robust_acc=0.95)])
    assert ("fail", "model in eval mode, BN stats unchanged") in checks(
        [row(model_unchanged=False)]
    )
    rise = "robust accuracy does not rise with eps"
    assert ("fail", rise) in checks([row(), row(eps=0.02, max_linf=0.02, robust_acc=0.7)])
    assert ("warn", rise) in checks([row(), row(eps=0.02, max_linf=0.02, robust_acc=0.6)])
    fgsm_rise = [row(attack="fgsm"), row(attack="fgsm", eps=0.02, max_linf=0.02, robust_acc=0.8)]
    assert checks(fgsm_rise) == {("note", rise)}
    assert ("fail", "PGD robust <= FGSM robust") in checks(
        [row(robust_acc=0.7), row(attack="fgsm", robust_acc=0.5)]
    )
    masking = [row(), row(attack="square", family="blackbox", robust_acc=0.3)]
    assert {level for level, c in checks(masking) if "gradient masking" in c} == {"warn"}
    # rows of different models are never compared
    assert (
        checks([row(model="a"), row(model="b", eps=0.02, max_linf=0.02, robust_acc=0.9)]) == set()
    )


def test_sweep_metrics_and_no_failures(data) -> None:
    model, x, y = data
    rows = robustness_sweep(
        model,
        x,
        y,
        attacks=("fgsm", "pgd", "square"),
        eps=(0.0, 2 / 255, 8 / 255),
        batch_size=16,
        options={"pgd": {"steps": 5, "seed": 0}, "square": {"max_queries": 30, "seed": 0}},
    )
    assert len(rows) == 9
    assert not [f for f in sanity_flags(rows) if f["level"] == "fail"]
    clean = float((model(x).argmax(1) == y).float().mean())
    for r in rows:
        assert r["clean_acc"] == pytest.approx(clean) and r["model_unchanged"]
        assert r["max_linf"] <= r["eps"] + 1e-6 and r["linf_median"] <= r["max_linf"]
        assert 0 <= r["success_rate"] <= 1
        if r["attack"] == "square" and r["eps"] > 0:
            assert 1 <= r["queries_median"] <= 30 and r["gradient_batches"] == 0
        else:
            assert r["queries_mean"] == 0
    by = {(r["attack"], r["eps"]): r for r in rows}
    # success rate counts only images the model had right: robust = clean * (1 - success)
    r = by[("pgd", 8 / 255)]
    assert r["robust_acc"] == pytest.approx(r["clean_acc"] * (1 - r["success_rate"]))
    assert by[("pgd", 8 / 255)]["robust_acc"] <= by[("fgsm", 8 / 255)]["robust_acc"]
    # every accuracy carries its Wilson interval, and the per-image outcomes behind it
    for r in rows:
        assert r["robust_acc_ci_low"] <= r["robust_acc"] <= r["robust_acc_ci_high"]
        assert r["clean_acc_ci_low"] <= r["clean_acc"] <= r["clean_acc_ci_high"]
        assert len(r[OUTCOMES]) == len(y) and sum(r[OUTCOMES]) / len(y) == r["robust_acc"]
        assert OUTCOMES not in scalar_fields(r)
    intervals, outcomes = attack_evidence([{"model": "m", **r} for r in rows])
    pgd = by[("pgd", 8 / 255)]
    assert intervals["m"]["pgd"]["eps_8/255"] == [
        pgd["robust_acc_ci_low"],
        pgd["robust_acc_ci_high"],
    ]
    assert outcomes["m"]["pgd"]["eps_8/255"] == pgd[OUTCOMES]
    assert sum(outcomes["m"]["clean"]) / len(y) == pytest.approx(clean)


def test_targeted_attacks_in_the_sweep(data) -> None:
    model, x, y = data
    fgsm, pgd = robustness_sweep(
        model,
        x,
        y,
        attacks=("fgsm", "pgd"),
        eps=(0.3,),
        targeted=("fgsm", "pgd"),
        options={"pgd": {"steps": 20, "seed": 0}},
    )
    assert fgsm["targeted"] and 0 <= fgsm["target_rate"] <= 1
    # the least-likely class is far; iterative steps get there where one step does not
    assert pgd["target_rate"] >= 0.5
    # reaching the target means a wrong prediction, except where the label was the target
    assert pgd["robust_acc"] <= 1 - pgd["target_rate"] + 4 / 32


def test_shards_resume_without_repeating_work(data, tmp_path) -> None:
    model, x, y = data
    store = ShardStore(tmp_path / "work")
    kwargs = dict(attacks=("pgd",), eps=(4 / 255,), batch_size=16, options={"pgd": {"seed": 0}})
    key = model_digest(model)
    # "killed" after the first batch: only its shard exists
    robustness_sweep(model, x[:16], y[:16], store=store, model_key=key, **kwargs)
    (first,) = list(store.folder.rglob("*.json"))
    stamp = first.stat().st_mtime_ns
    full = robustness_sweep(model, x, y, store=store, model_key=key, **kwargs)
    files = list(store.folder.rglob("*.json"))
    assert len(files) == 2 and first.stat().st_mtime_ns == stamp  # reused, not rewritten
    fresh = robustness_sweep(model, x, y, **kwargs)
    # same numbers as a fresh sweep (the time is the stored one)
    assert [{**r, "seconds": 0} for r in full] == [{**r, "seconds": 0} for r in fresh]
    # a different attack config or model is a different shard
    other = {**kwargs, "options": {"pgd": {"seed": 1}}}
    robustness_sweep(model, x, y, store=store, model_key=key, **other)
    assert len(list(store.folder.rglob("*.json"))) == 4


def test_transfer_matrix(data) -> None:
    model, x, y = data
    other = make_tiny_cnn(seed=1)
    with torch.no_grad():
        other_labels = other(x).argmax(1)
    rows, adversarials = transfer_matrix(
        {"a": (model, y), "other": (other, other_labels)},
        {"a": model},
        x,
        y,
        attack=FGSM(eps=8 / 255),
    )
    assert [(r["source"], r["target"], r["white_box"]) for r in rows] == [
        ("a", "a", True),
        ("other", "a", False),
    ]
    white = FGSM(eps=8 / 255)(model, x, y)
    assert torch.equal(adversarials["a"], white.x_adv)
    correct = model(x).argmax(1) == y
    assert rows[0]["robust_acc"] == pytest.approx(float((correct & ~white.success).float().mean()))
    for r in rows:
        assert r["robust_acc"] <= r["clean_acc"]


def test_bf16_autocast_agrees(data) -> None:
    model, x, _ = data
    with torch.no_grad():
        agree = (Autocast(model)(x).argmax(1) == model(x).argmax(1)).float().mean()
    assert agree >= 0.9


def test_attack_params_validation(tmp_path) -> None:
    p = AttackParams.model_validate(
        {"attacks": ["pgd", "square"], "pgd": {"steps": 3, "step_size": "1/255"}}
    )
    assert p.attack_kwargs("pgd") == {
        "steps": 3,
        "step_size": pytest.approx(1 / 255),
        "restarts": 1,
        "random_start": True,
        "early_stop": True,
        "seed": 0,
    }
    assert p.attack_kwargs("fgsm") == {}
    for text, expected in [
        ("attack:\n  attacks: [cw]\n", "'fgsm', 'bim', 'pgd', 'mifgsm', 'square'"),
        ("attack:\n  pgd: {steps: 0}\n", "attack.pgd.steps"),
        ("attack:\n  pgd: {stepz: 3}\n", "allowed keys here: steps, step_size"),
        ("attack:\n  models: [../x]\n", f"allowed values are {[*METHODS, 'imagenet']}"),
        ("attack:\n  square: {p_init: 2}\n", "attack.square.p_init"),
        ("attack:\n  transfer: {attack: square}\n", "attack.transfer.attack"),
        ("attack:\n  attacks: [fgsm, fgsm]\n", "without repeats"),
    ]:
        path = tmp_path / "params.yaml"
        path.write_text(text)
        with pytest.raises(ParamsError, match=expected.replace("[", r"\[")):
            load_params(path)
    path.write_text(yaml.safe_dump({"attack": {"models": ["svm", "top", "imagenet"]}}))
    assert load_params(path).attack.models == ("svm", "top", "imagenet")


def test_plots_exist_without_transfer_or_grid(tmp_path) -> None:
    from transferlab.report import plot_adversarial_grid, plot_transfer_matrix

    # the stage declares both outputs, so they are written even when nothing is configured
    assert plot_transfer_matrix([], tmp_path / "t.png").stat().st_size > 0
    assert plot_adversarial_grid([], tmp_path / "g.png").stat().st_size > 0


def test_transfer_crafting_takes_every_step() -> None:
    from transferlab.robustness import transfer_attack

    p = Params.model_validate(
        {"attack": {"mifgsm": {"steps": 4}, "transfer": {"sources": ["svm"], "attack": "mifgsm"}}}
    )
    assert p.attack.mifgsm.early_stop  # the evaluation stops early by default...
    attack = transfer_attack(p)
    assert attack.steps == 4 and not attack.early_stop  # ...crafting for transfer never does


def test_fgsm_eps_share_one_gradient_and_resume_per_eps(data, tmp_path) -> None:
    model, x, y = data
    eps = (0.0, 2 / 255, 8 / 255)
    batches = -(-len(x) // 16)
    store, key = ShardStore(tmp_path / "work"), model_digest(model)
    kwargs = dict(attacks=("fgsm",), batch_size=16, model_key=key)
    # "killed" after the first eps: its shards exist, the others are computed on resume
    robustness_sweep(model, x, y, eps=eps[1:2], store=store, **kwargs)
    stamps = {p: p.stat().st_mtime_ns for p in store.folder.rglob("*.json")}
    swept = robustness_sweep(model, x, y, eps=eps, store=store, **kwargs)
    assert len(list(store.folder.rglob("*.json"))) == batches * len(eps)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    alone = [robustness_sweep(model, x, y, eps=(e,), **kwargs)[0] for e in eps]
    # The same numbers as attacking at each eps on its own (the time is a share of the pass).
    assert [{**r, "seconds": 0} for r in swept] == [{**r, "seconds": 0} for r in alone]
    assert [r["gradient_batches"] for r in swept] == [0, batches, batches]
