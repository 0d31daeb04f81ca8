import numpy as np
import pytest

from lrdeploy.errors import BudgetError
from lrdeploy.lowrank.allocate import LayerShape, allocate, energy_ranks, realized_ratio, uniform_ranks

MINILM_LIKE = [LayerShape(f"l{i}/{kind}", d_in, d_out)
               for i in range(6)
               for kind, d_in, d_out in [("q", 384, 384), ("k", 384, 384), ("v", 384, 384), ("o", 384, 384),
                                         ("up", 384, 1536), ("down", 1536, 384)]]


@pytest.mark.parametrize("budget", [0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("multiple", [8, 16, 64])
def test_uniform_never_exceeds_budget(budget, multiple):
    try:
        plan = uniform_ranks(MINILM_LIKE, budget, multiple)
    except BudgetError:
        assert realized_ratio(MINILM_LIKE, {s.name: multiple for s in MINILM_LIKE}) > budget
        return
    assert realized_ratio(MINILM_LIKE, plan) <= budget + 1e-12
    assert all(r is None or r % multiple == 0 for r in plan.values())
    # and uses it: within one rank step of every layer kind of the budget
    assert realized_ratio(MINILM_LIKE, plan) > budget - multiple * (384 + 384) / (384 * 384) - 1e-9 or budget > 0.95


def test_uniform_keeps_same_fraction_per_layer():
    plan = uniform_ranks(MINILM_LIKE, 0.5, 16)
    assert plan["l0/q"] == 96  # 0.5 · 384·384 / 768
    assert plan["l0/up"] in (144, 160)  # 0.5 · 384·1536 / 1920 = 153.6


def test_uniform_leaves_dense_where_rank_would_not_save():
    shapes = [LayerShape("small", 64, 64)]  # break-even rank 32
    assert uniform_ranks(shapes, 1.0, 16) == {"small": None}  # rank 32 = 4096 params, no saving
    assert uniform_ranks(shapes, 0.6, 16) == {"small": 16}  # 19.2 rounds to 16


def test_energy_gives_rank_where_spectrum_is_spread():
    shapes = [LayerShape("flat", 256, 256), LayerShape("peaked", 256, 256)]
    energies = {"flat": np.ones(256), "peaked": np.r_[np.ones(16) * 100, np.full(240, 1e-6)]}
    plan = energy_ranks(shapes, energies, 0.5, 16)
    assert plan["peaked"] == 16
    assert plan["flat"] > 64
    assert realized_ratio(shapes, plan) <= 0.5


@pytest.mark.parametrize("budget", [0.2, 0.5, 0.8, 1.0])
def test_energy_never_exceeds_budget(budget):
    rng = np.random.default_rng(0)
    energies = {s.name: np.sort(rng.exponential(size=min(s.d_in, s.d_out)))[::-1] for s in MINILM_LIKE}
    plan = allocate("energy", MINILM_LIKE, budget, 16, energies)
    assert realized_ratio(MINILM_LIKE, plan) <= budget


@pytest.mark.parametrize("budget, message", [
    (0.0, r"rank budget 0.0 is outside \(0, 1\]; pass e.g. --rank-budget 0.5"),
    (1.5, r"rank budget 1.5 is outside \(0, 1\]"),
    (0.01, r"rank budget 0.01 is below what the smallest rank \(16\) keeps \(0.0[0-9]+\); raise --rank-budget"),
])
def test_budget_errors(budget, message):
    with pytest.raises(BudgetError, match=message):
        uniform_ranks(MINILM_LIKE, budget, 16)
