"""The gradient-masking flags fire on a model that hides its gradients behind a
non-differentiable input quantiser, and not on the same model without it."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tests.unit.attacks.conftest import make_tiny_cnn, random_images
from transferlab.evaluate import masking_rows, sanity_flags

CHECKS = {
    "blackbox": "black-box robust >= white-box",
    "steps": "robust accuracy falls as PGD steps/restarts grow",
    "large_eps": "PGD at large eps reaches ~0%",
}


class Quantise(nn.Module):
    """Rounds pixels to ``levels`` steps: the forward pass barely changes, the gradient is 0."""

    def __init__(self, levels: int):
        super().__init__()
        self.levels = levels

    def forward(self, x: Tensor) -> Tensor:
        return torch.round(x * self.levels) / self.levels


@pytest.fixture(scope="module")
def probes() -> dict[str, set[str]]:
    """Per model ("honest", "masked"): the masking checks its probe rows flag."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    honest = make_tiny_cnn()
    masked = nn.Sequential(Quantise(8), honest).eval()
    x = random_images(64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = honest(x).argmax(1)
    fired = {}
    for name, model in (("honest", honest), ("masked", masked)):
        rows = masking_rows(model, x, y, eps=2 / 255, square_queries=200, batch_size=64)
        rows = [{"model": name, **r} for r in rows]
        checks = [f["check"] for f in sanity_flags(rows)]
        fired[name] = {k for k, text in CHECKS.items() if any(c.startswith(text) for c in checks)}
        # the probes are real attacks: the honest model falls at 64/255, Square finds something
        assert {r["probe"] for r in rows} == {"pgd_budget", "large_eps", "blackbox"}
    torch.set_num_threads(threads)
    return fired


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_flag_fires_on_the_masked_model(probes, check: str) -> None:
    assert check in probes["masked"]


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_flag_stays_quiet_on_the_honest_model(probes, check: str) -> None:
    assert check not in probes["honest"]


def test_flags_judge_rows_alone() -> None:
    def row(attack, probe, eps, acc, budget=None):
        r = {"model": "m", "attack": attack, "probe": probe, "eps": eps, "n": 10}
        r |= {"clean_acc": 0.9, "robust_acc": acc, "max_linf": eps, "family": "whitebox"}
        return r if budget is None else {**r, "budget": budget}

    falling = [
        row("pgd_1x1", "pgd_budget", 0.01, 0.8, 1),
        row("pgd_20x1", "pgd_budget", 0.01, 0.5, 20),
    ]
    flat = [
        row("pgd_1x1", "pgd_budget", 0.01, 0.8, 1),
        row("pgd_20x1", "pgd_budget", 0.01, 0.8, 20),
    ]
    fired = lambda rows: {f["check"] for f in sanity_flags(rows)}  # noqa: E731
    assert not any(CHECKS["steps"] in c for c in fired(falling))
    assert any(CHECKS["steps"] in c for c in fired(flat))
    assert any(CHECKS["large_eps"] in c for c in fired([row("pgd", "large_eps", 0.25, 0.1)]))
    assert not fired([row("pgd", "large_eps", 0.25, 0.0)])
