"""Black-box attacks: the oracle is the only view of the model; budgets and counts are exact."""

from __future__ import annotations

import pytest
import torch
import torchattacks
from torch import Tensor, nn

from tests.unit.attacks.conftest import make_tiny_cnn, random_images
from transferlab.attacks import (
    MIFGSM,
    NES,
    PGD,
    SPSA,
    BlackBoxAttack,
    HopSkipJump,
    QueryBudgetExceeded,
    ScoreOracle,
    Square,
)


@pytest.fixture
def big_batch(tiny_cnn: nn.Sequential) -> tuple[Tensor, Tensor]:
    """64 random images labelled with the tiny CNN's clean predictions (clean accuracy 1)."""
    x = random_images(64, torch.Generator().manual_seed(5))
    with torch.no_grad():
        return x, tiny_cnn(x).argmax(1)


def test_oracle_counts_and_enforces_the_budget(tiny_cnn: nn.Sequential, tiny_batch) -> None:
    x, _ = tiny_batch
    oracle = ScoreOracle(lambda c, i: tiny_cnn(c).log_softmax(1), 16, 3, x.device)
    scores = oracle(x.clone().requires_grad_(True))
    # Scores carry no autograd graph back to the model, even for an input that wants one.
    assert scores.grad_fn is None and not scores.requires_grad
    assert torch.allclose(scores.exp().sum(1), torch.ones(16))
    oracle(x[:2].repeat(2, 1, 1, 1), torch.tensor([0, 1, 0, 1]))
    assert oracle.used.tolist() == [3, 3] + [1] * 14
    with pytest.raises(QueryBudgetExceeded, match="budget of 3"):
        oracle(x[:1], torch.tensor([0]))
    assert oracle.used[0] == 3  # a refused query is not spent


def test_blackbox_attacks_cannot_override_run() -> None:
    with pytest.raises(TypeError, match="search"):

        class Cheat(BlackBoxAttack):  # noqa: F841 - defining it is the test
            def run(self, model, x, y):
                return x


def test_search_only_gets_the_oracle(tiny_cnn: nn.Sequential, tiny_batch) -> None:
    seen: dict = {}

    class Probe(BlackBoxAttack):
        def search(self, predict, x, y, generator):
            seen["predict"] = type(predict)
            scores = predict(x.clone().requires_grad_(True))
            with pytest.raises(RuntimeError, match="does not require grad"):
                scores.sum().backward()
            return x

    x, y = tiny_batch
    result = Probe(eps=0.1, max_queries=5)(tiny_cnn, x, y)
    assert seen["predict"] is ScoreOracle
    assert result.queries.tolist() == [1] * 16 and result.gradients == 0


@pytest.mark.parametrize("cls", [Square, NES, SPSA, HopSkipJump])
def test_queries_within_budget_and_misclassified_stop_at_one(
    cls: type[BlackBoxAttack], tiny_cnn: nn.Sequential, tiny_batch
) -> None:
    x, y = tiny_batch  # the first 4 labels are random, so mostly already wrong
    with torch.no_grad():
        wrong = tiny_cnn(x).argmax(1) != y
    result = cls(eps=8 / 255, max_queries=45, seed=0)(tiny_cnn, x, y)
    assert (result.queries <= 45).all() and (result.queries >= 1).all()
    assert (result.queries[wrong] == 1).all()
    assert result.success[wrong].all()
    assert result.gradients == 0
    assert (result.x_adv - x).abs().max() <= 8 / 255 + 1e-6


@pytest.mark.parametrize("cls", [Square, NES, SPSA, HopSkipJump])
def test_seeded_blackbox_is_reproducible(cls, tiny_cnn: nn.Sequential, tiny_batch) -> None:
    x, y = tiny_batch
    a = cls(eps=8 / 255, max_queries=30, seed=1)(tiny_cnn, x, y)
    b = cls(eps=8 / 255, max_queries=30, seed=1)(tiny_cnn, x, y)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)


def test_targeted_square_reaches_targets(tiny_cnn: nn.Sequential, big_batch) -> None:
    x, y = big_batch
    target = (y + 1) % 10
    result = Square(eps=0.3, max_queries=300, targeted=True, seed=0)(tiny_cnn, x, target)
    with torch.no_grad():
        assert torch.equal(result.success, tiny_cnn(result.x_adv).argmax(1) == target)
    assert result.success_rate >= 0.5


def test_blackbox_is_weaker_than_whitebox(tiny_cnn: nn.Sequential, big_batch) -> None:
    # The sanity flag's premise on a model without gradient masking.
    x, y = big_batch
    white = PGD(eps=8 / 255, steps=10, seed=0)(tiny_cnn, x, y).success_rate
    for cls in (Square, NES, SPSA, HopSkipJump):
        assert cls(eps=8 / 255, max_queries=100, seed=0)(tiny_cnn, x, y).success_rate <= white


@pytest.mark.parametrize("eps", [4 / 255, 8 / 255])
def test_square_agrees_with_torchattacks(eps: float, big_batch, one_thread) -> None:
    # Both are randomized; compare success rates averaged over seeds within a tolerance of
    # about two standard errors (128 attacked images per library).
    x, y = big_batch
    model = make_tiny_cnn()
    ours, ref = [], []
    for seed in (0, 1):
        ours.append(Square(eps=eps, max_queries=100, p_init=0.05, seed=seed)(model, x, y))
        torch.manual_seed(seed)
        adv = torchattacks.Square(model, eps=eps, n_queries=100, p_init=0.05, seed=seed)(x, y)
        with torch.no_grad():
            ref.append(float((model(adv).argmax(1) != y).float().mean()))
    ours_rate = sum(r.success_rate for r in ours) / 2
    ref_rate = sum(ref) / 2
    assert abs(ours_rate - ref_rate) <= 0.1, (ours_rate, ref_rate)


def test_mifgsm_matches_torchattacks(tiny_cnn: nn.Sequential, tiny_batch) -> None:
    x, y = tiny_batch
    ours = MIFGSM(eps=8 / 255, steps=5, step_size=2 / 255)(tiny_cnn, x, y)
    ref = torchattacks.MIFGSM(tiny_cnn, eps=8 / 255, alpha=2 / 255, steps=5, decay=1.0)(x, y)
    assert (ours.x_adv - ref).abs().max() <= 1e-6
    assert ours.gradients == 5


def test_blackbox_validation() -> None:
    with pytest.raises(ValueError, match="max_queries"):
        Square(eps=0.1, max_queries=0)
    with pytest.raises(ValueError, match="p_init"):
        Square(eps=0.1, p_init=0)
    with pytest.raises(ValueError, match="samples"):
        NES(eps=0.1, samples=0)
    with pytest.raises(ValueError, match="sigma"):
        SPSA(eps=0.1, sigma=0)


def test_hopskipjump_reads_only_the_label(tiny_cnn: nn.Sequential, tiny_batch) -> None:
    # A model that answers with a bare one-hot label leads to the very same search. (The label
    # is the top log-probability's, what the oracle reports: at the boundary two logits are so
    # close that rounding in log_softmax can decide between them.)
    x, y = tiny_batch

    def label_only(z: Tensor) -> Tensor:
        label = tiny_cnn(z).log_softmax(1).argmax(1)
        return 5.0 * torch.nn.functional.one_hot(label, 10).float()

    class LabelOnly(nn.Module):
        def forward(self, z: Tensor) -> Tensor:
            return label_only(z)

    a = HopSkipJump(eps=16 / 255, max_queries=300, seed=2)(tiny_cnn, x, y)
    b = HopSkipJump(eps=16 / 255, max_queries=300, seed=2)(LabelOnly().eval(), x, y)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)


def test_hopskipjump_shrinks_the_perturbation_with_more_queries(big_batch, tiny_cnn) -> None:
    x, y = big_batch
    x, y = x[:12], y[:12]

    def distances(budget: int) -> Tensor:
        # eps = 1 keeps the raw result: its L-inf distance is what the attack minimises.
        res = HopSkipJump(eps=1.0, max_queries=budget, init_tries=200, seed=0)(tiny_cnn, x, y)
        d = (res.x_adv - x).flatten(1).abs().amax(1)
        return torch.where(res.success, d, torch.inf)

    few, many = distances(300), distances(1500)
    # Every image starts from another image of the batch, so every one ends adversarial.
    assert torch.isfinite(few).all() and torch.isfinite(many).all()
    # The images share one random stream, so runs with other budgets drift apart: most images,
    # not all, end nearer; the typical one clearly nearer (measured: 25% nearer).
    assert (many <= few + 1e-6).float().mean() >= 0.75
    assert many.median() < 0.85 * few.median()
