"""Fast attack tests on a tiny random CNN and a linear model (no real weights)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torchattacks
from torch import Tensor, nn

from transferlab.attacks import (
    ATTACKS,
    BIM,
    FGSM,
    MIFGSM,
    PGD,
    Attack,
    ProjectedGradient,
    make_attack,
    project,
    sweep,
)

EPS_BY_NORM = {"linf": [0.0, 1 / 255, 8 / 255, 0.3], "l2": [0.0, 0.1, 1.0, 5.0]}
TABLE = [(name, eps) for name in ATTACKS for eps in EPS_BY_NORM[make_attack(name, eps=1.0).norm]]


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def distance(x_adv: Tensor, x: Tensor, norm: str) -> Tensor:
    """(N,) per-image distance in the attack's norm."""
    d = (x_adv - x).flatten(1)
    return d.abs().amax(dim=1) if norm == "linf" else d.norm(p=2, dim=1)


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("name", "eps"), TABLE, ids=[f"{n}-{e:.4g}" for n, e in TABLE])
def test_table_contract(name: str, eps: float, tiny_cnn: nn.Sequential, tiny_batch) -> None:
    x, y = tiny_batch
    before = snapshot(tiny_cnn)
    flags = [p.requires_grad for p in tiny_cnn.parameters()]
    torch.manual_seed(0)  # random starts
    attack = make_attack(name, eps=eps)
    result = attack(tiny_cnn, x, y)

    tol = 1e-6 if attack.norm == "linf" else 1e-5
    assert result.x_adv.shape == x.shape and result.x_adv.dtype == torch.float32
    assert (distance(result.x_adv, x, attack.norm) <= eps + tol).all()
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert result.success.shape == (16,) and result.success.dtype == torch.bool
    assert result.queries.shape == (16,) and result.queries.dtype == torch.int64
    robust = accuracy(tiny_cnn, result.x_adv, y)
    assert robust == pytest.approx(1 - result.success_rate)
    assert robust <= accuracy(tiny_cnn, x, y)
    if eps == 0:
        assert torch.equal(result.x_adv, x)
        assert result.gradients == 0
    # The model comes back exactly as it went in: eval mode, same weights and BN statistics.
    assert not any(m.training for m in tiny_cnn.modules())
    after = tiny_cnn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in tiny_cnn.parameters()] == flags
    assert all(p.grad is None for p in tiny_cnn.parameters())


@pytest.mark.parametrize("name", list(ATTACKS))
def test_large_eps_fools_tiny_cnn(name: str, tiny_cnn: nn.Sequential, tiny_batch) -> None:
    x, y = tiny_batch
    eps = EPS_BY_NORM[make_attack(name, eps=1.0).norm][-1]
    result = make_attack(name, eps=eps)(tiny_cnn, x, y)
    assert result.success_rate >= 0.75


@pytest.mark.parametrize("name", list(ATTACKS))
def test_training_mode_raises(name: str, tiny_cnn: nn.Sequential, tiny_batch) -> None:
    x, y = tiny_batch
    before = snapshot(tiny_cnn)
    with pytest.raises(ValueError, match="eval mode"):
        make_attack(name, eps=0.1)(tiny_cnn.train(), x, y)
    # A single BatchNorm left in training mode would update its statistics just the same.
    tiny_cnn.eval()[2].train()
    with pytest.raises(ValueError, match="eval mode"):
        make_attack(name, eps=0.1)(tiny_cnn, x, y)
    after = tiny_cnn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_requires_grad_flags_restored(tiny_cnn: nn.Sequential, tiny_batch) -> None:
    x, y = tiny_batch
    params = list(tiny_cnn.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i % 2 == 0)
    PGD(eps=8 / 255, steps=3)(tiny_cnn, x, y)
    assert [p.requires_grad for p in params] == [i % 2 == 0 for i in range(len(params))]
    assert all(p.grad is None for p in params)


def linear_model(w: Tensor, b: Tensor) -> nn.Module:
    """Logits = flatten(x) @ w.T + b, so grad_x of the loss is hand-computable."""
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return nn.Sequential(nn.Flatten(), lin).eval()


def test_fgsm_linear_model_is_hand_checkable() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3 * 4 * 4, generator=gen)
    model = linear_model(w, torch.zeros(2))
    x = torch.rand(6, 3, 4, 4, generator=gen)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    eps = 0.1
    # Two classes: grad_x CE(z, y) = p_other * (w_other - w_y), so its sign is that of the row
    # difference (p_other > 0).
    row_diff = (w[1 - y] - w[y]).view(6, 3, 4, 4)
    expected = (x + eps * row_diff.sign()).clamp(0, 1)
    result = FGSM(eps=eps)(model, x, y)
    assert torch.equal(result.x_adv, expected)

    # Targeted at the other class: descend CE towards it, the same direction here.
    targeted = FGSM(eps=eps, targeted=True)(model, x, 1 - y)
    assert torch.equal(targeted.x_adv, expected)
    assert torch.equal(targeted.success, model(expected).argmax(1) == 1 - y)


def test_targeted_pgd_reaches_target() -> None:
    gen = torch.Generator().manual_seed(0)
    model = linear_model(torch.randn(5, 48, generator=gen), torch.zeros(5))
    x = torch.rand(10, 3, 4, 4, generator=gen)
    target = torch.arange(10) % 5
    result = PGD(eps=0.5, steps=20, targeted=True, seed=0)(model, x, target)
    assert result.success.all()
    with torch.no_grad():
        assert torch.equal(model(result.x_adv).argmax(1), target)


def test_fgsm_is_one_projected_gradient_step(tiny_cnn: nn.Sequential, tiny_batch) -> None:
    x, y = tiny_batch
    eps = 4 / 255
    assert issubclass(FGSM, ProjectedGradient) and "run" not in vars(FGSM)
    fgsm = FGSM(eps=eps)(tiny_cnn, x, y)
    step = ProjectedGradient(eps=eps, steps=1, step_size=eps, random_start=False)(tiny_cnn, x, y)
    assert torch.equal(fgsm.x_adv, step.x_adv)
    assert fgsm.gradients == 1 and fgsm.queries.sum() == 0


def test_defaults_match_torchattacks() -> None:
    # torchattacks' BIM and PGD defaults: eps=8/255, alpha=2/255, steps=10.
    for cls in (BIM, PGD):
        attack = cls(eps=8 / 255)
        assert attack.steps == 10 and attack.step_size == pytest.approx(2 / 255)
    assert not BIM(eps=0.1).random_start and PGD(eps=0.1).random_start
    assert make_attack("pgd_l2", eps=1.0).norm == "l2"


def test_call_counts(tiny_cnn: nn.Sequential, tiny_batch) -> None:
    x, y = tiny_batch
    one = PGD(eps=8 / 255, steps=4)(tiny_cnn, x, y)
    assert one.gradients == 4 and torch.equal(one.queries, torch.zeros(16, dtype=torch.int64))
    three = PGD(eps=8 / 255, steps=4, restarts=3, seed=0)(tiny_cnn, x, y)
    # Each restart scores its images with one forward query; an image fooled by one restart
    # takes no part in the next ones, so it stops early with fewer queries.
    assert three.gradients == 12 and three.queries.min() >= 1 and three.queries.max() == 3
    assert three.success[three.queries < 3].all() and (three.queries < 3).any()
    assert one.seconds > 0


def test_restarts_keep_first_success(tiny_cnn: nn.Sequential, tiny_batch) -> None:
    x, y = tiny_batch
    eps = 2 / 255
    # The same seed makes the first restart identical to the single run, so the best of three
    # must succeed wherever the single run did.
    single = PGD(eps=eps, steps=3, seed=7)(tiny_cnn, x, y)
    multi = PGD(eps=eps, steps=3, restarts=3, seed=7)(tiny_cnn, x, y)
    assert not (single.success & ~multi.success).any()
    assert torch.equal(multi.x_adv[single.success], single.x_adv[single.success])


def test_seed_makes_random_start_reproducible(tiny_cnn: nn.Sequential, tiny_batch) -> None:
    x, y = tiny_batch
    a = PGD(eps=8 / 255, steps=2, seed=3)(tiny_cnn, x, y).x_adv
    b = PGD(eps=8 / 255, steps=2, seed=3)(tiny_cnn, x, y).x_adv
    c = PGD(eps=8 / 255, steps=2, seed=4)(tiny_cnn, x, y).x_adv
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_works_when_caller_disabled_grad(mode: str, tiny_cnn: nn.Sequential, tiny_batch) -> None:
    x, y = tiny_batch
    expected = BIM(eps=8 / 255, steps=3)(tiny_cnn, x, y)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        # Tensors created here are inference tensors in inference mode.
        x_in, y_in = x.clone(), y.clone()
        result = BIM(eps=8 / 255, steps=3)(tiny_cnn, x_in, y_in)
    assert torch.equal(result.x_adv, expected.x_adv)
    assert result.gradients == 3


@pytest.mark.parametrize(
    ("ours", "reference"),
    [
        (FGSM(eps=4 / 255), lambda m: torchattacks.FGSM(m, eps=4 / 255)),
        (
            BIM(eps=4 / 255, steps=5),
            lambda m: torchattacks.PGD(m, eps=4 / 255, alpha=2 / 255, steps=5, random_start=False),
        ),
        (
            make_attack("pgd_l2", eps=0.5, steps=5, random_start=False),
            lambda m: torchattacks.PGDL2(m, eps=0.5, alpha=0.25, steps=5, random_start=False),
        ),
    ],
    ids=["fgsm", "bim", "pgd_l2"],
)
def test_agrees_with_torchattacks_on_tiny_cnn(
    ours: Attack, reference, tiny_cnn: nn.Sequential, tiny_batch
) -> None:
    x, y = tiny_batch
    ref = reference(tiny_cnn)(x, y)
    diff = (ours(tiny_cnn, x, y).x_adv - ref).abs().max()
    assert diff <= 1e-6


def test_project_onto_ball_and_box() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 5, 5, generator=gen)
    far = x + 3 * torch.randn(8, 3, 5, 5, generator=gen)
    for norm, eps in (("linf", 0.05), ("l2", 0.7)):
        p = project(x, far, eps=eps, norm=norm)
        assert (distance(p, x, norm) <= eps + 1e-6).all()
        assert p.min() >= 0 and p.max() <= 1
        # Points already inside the ball and the box are left alone.
        near = project(x, x + 0.5 * (p - x), eps=eps, norm=norm)
        assert torch.allclose(near, x + 0.5 * (p - x), atol=1e-7)
    with pytest.raises(ValueError, match="linf"):
        project(x, far, eps=0.1, norm="l1")


def test_make_attack_errors() -> None:
    with pytest.raises(ValueError, match=re.escape(str(sorted(ATTACKS)))):  # every registered one
        make_attack("cw", eps=0.1)
    with pytest.raises(ValueError, match="steps"):
        make_attack("fgsm", eps=0.1, steps=3)
    with pytest.raises(ValueError, match="eps"):
        make_attack("pgd", eps=-0.1)
    with pytest.raises(ValueError, match="steps"):
        make_attack("pgd", eps=0.1, steps=0)
    with pytest.raises(ValueError, match="norm"):
        ProjectedGradient(eps=0.1, norm="l1")
    with pytest.raises(TypeError):
        PGD(0.1)  # hyperparameters are keyword-only


def test_input_validation(tiny_cnn: nn.Sequential, tiny_batch) -> None:
    x, y = tiny_batch
    attack = FGSM(eps=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attack(tiny_cnn, x * 2 - 1, y)
    with pytest.raises(ValueError, match="shape"):
        attack(tiny_cnn, x, y[:3])


def test_empty_batch(tiny_cnn: nn.Sequential) -> None:
    result = PGD(eps=0.1)(copy.deepcopy(tiny_cnn), torch.zeros(0, 3, 8, 8), torch.zeros(0))
    assert result.x_adv.shape == (0, 3, 8, 8) and result.success.shape == (0,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(ATTACKS))
def test_runs_on_cuda(name: str, tiny_cnn: nn.Sequential, tiny_batch) -> None:
    x, y = (t.cuda() for t in tiny_batch)
    model = tiny_cnn.cuda()
    eps = EPS_BY_NORM[make_attack(name, eps=1.0).norm][2]
    attack = make_attack(name, eps=eps, **({} if name in ("fgsm", "bim") else {"seed": 0}))
    result = attack(model, x, y)
    assert result.x_adv.is_cuda and result.success.is_cuda and result.queries.is_cuda
    assert (distance(result.x_adv, x, attack.norm) <= eps + 1e-5).all()


def test_result_carries_the_logits_of_its_adversarials(tiny_cnn: nn.Sequential, tiny_batch) -> None:
    # The pipeline reads predictions and confidences from these instead of a second forward.
    x, y = tiny_batch
    result = PGD(eps=8 / 255, steps=2, seed=0)(tiny_cnn, x, y)
    with torch.no_grad():
        expected = tiny_cnn(result.x_adv)
    assert torch.allclose(result.logits, expected, atol=1e-5)
    assert torch.equal(result.success, expected.argmax(1) != y)


@pytest.mark.parametrize("cls", [BIM, PGD, MIFGSM])
def test_early_stop_only_gains(cls, tiny_cnn: nn.Sequential, tiny_batch) -> None:
    x, y = tiny_batch
    kwargs = {"eps": 4 / 255, "steps": 6} | ({"seed": 0} if cls is not BIM else {})
    full = cls(**kwargs)(tiny_cnn, x, y)
    early = cls(**kwargs, early_stop=True)(tiny_cnn, x, y)
    # Each image follows the same iterates until it is fooled, so every image the full run
    # fools is fooled by the early-stopping run too (at that or an earlier iterate).
    assert not (full.success & ~early.success).any()
    assert early.success.sum() > 0 and (early.x_adv - x).abs().amax() <= 4 / 255 + 1e-7
    # The success check reuses the logits of the forward pass that stopped each image.
    with torch.no_grad():
        assert torch.allclose(early.logits, tiny_cnn(early.x_adv), atol=1e-5)
    assert torch.equal(early.success, early.logits.argmax(1) != y)


def test_early_stop_skips_finished_images(tiny_cnn: nn.Sequential, tiny_batch) -> None:
    x, y = tiny_batch
    seen: list[int] = []

    class Spy(nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            if z.requires_grad:
                seen.append(z.shape[0])
            return tiny_cnn(z)

    result = BIM(eps=16 / 255, steps=8, early_stop=True)(Spy().eval(), x, y)
    # Batches shrink as images are fooled, and the loop ends once all of them are.
    assert seen == sorted(seen, reverse=True) and seen[-1] < seen[0] == len(x)
    assert result.gradients == len(seen)
    if result.success.all():
        assert len(seen) < 8


def test_early_stop_targeted_stops_at_the_target(tiny_cnn: nn.Sequential, tiny_batch) -> None:
    x, y = tiny_batch
    target = (y + 1) % 10
    result = PGD(eps=16 / 255, steps=8, seed=0, targeted=True, early_stop=True)(tiny_cnn, x, target)
    assert torch.equal(result.success, result.logits.argmax(1) == target)
    assert result.success.any()


@pytest.mark.parametrize("targeted", [False, True])
def test_fgsm_sweep_is_one_gradient_and_bit_identical(
    tiny_cnn: nn.Sequential, tiny_batch, targeted: bool
) -> None:
    x, y = tiny_batch
    calls: list[bool] = []

    class Spy(nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            calls.append(z.requires_grad)
            return tiny_cnn(z)

    model = Spy().eval()
    attacks = [FGSM(eps=e, targeted=targeted) for e in (0.0, 1 / 255, 4 / 255, 8 / 255)]
    swept = sweep(model, x, y, attacks)
    # One forward-backward pass, and one success check per nonzero eps (eps 0 reuses the pass).
    assert calls == [True, False, False, False]
    for attack, res in zip(attacks, swept, strict=True):
        alone = attack(tiny_cnn, x, y)
        assert torch.equal(res.x_adv, alone.x_adv) and torch.equal(res.success, alone.success)
        assert torch.allclose(res.logits, alone.logits, atol=1e-6)
        assert res.gradients == alone.gradients and res.seconds > 0
    assert torch.equal(swept[0].x_adv, x)


def test_sweep_runs_other_attacks_one_by_one(tiny_cnn: nn.Sequential, tiny_batch) -> None:
    x, y = tiny_batch
    attacks = [PGD(eps=4 / 255, steps=2, seed=0), FGSM(eps=4 / 255)]
    for res, attack in zip(sweep(tiny_cnn, x, y, attacks), attacks, strict=True):
        assert torch.equal(res.x_adv, attack(tiny_cnn, x, y).x_adv)
