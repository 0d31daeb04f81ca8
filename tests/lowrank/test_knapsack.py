"""The option-tree knapsack against brute force: least loss whose savings reach the target, and the choices."""

import itertools

import numpy as np
import pytest

from lrdeploy.lowrank.knapsack import AllOf, OneOf, Option, max_saving, solve


def _layer(name, options):
    return OneOf([Option(0.0, 0.0, (name, None))] + [Option(s, l, (name, k)) for k, (s, l) in enumerate(options)])


def _brute_force(groups, alternatives, target):
    """groups: per AllOf child a list of (saving, loss, choice); the last child is OneOf(drop, AllOf(more groups))."""
    best = None
    for picks in itertools.product(*groups):
        base_s, base_l = sum(p[0] for p in picks), sum(p[1] for p in picks)
        for alt in alternatives:
            for inner in itertools.product(*alt):
                saving, loss = base_s + sum(p[0] for p in inner), base_l + sum(p[1] for p in inner)
                if saving >= target and (best is None or loss < best):
                    best = loss
    return best


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_random_trees(seed):
    rng = np.random.default_rng(seed)

    def options(name, count):
        return [(name, None, 0.0, 0.0)] + [(name, k, float(rng.uniform(0.5, 5)), float(rng.uniform(0, 3)))
                                           for k in range(count)]

    layers = [options(f"l{i}", 3) for i in range(3)]
    inner = [options(f"m{i}", 2) for i in range(2)]
    drop = ("drop", 0, float(rng.uniform(3, 8)), float(rng.uniform(0.5, 4)))
    tree = AllOf([*(OneOf([Option(s, l, (n, k)) for n, k, s, l in layer]) for layer in layers),
                  OneOf([Option(drop[2], drop[3], "drop"),
                         AllOf([OneOf([Option(s, l, (n, k)) for n, k, s, l in layer]) for layer in inner])])])
    groups = [[(s, l) for _, _, s, l in layer] for layer in layers]
    alternatives = [[[(drop[2], drop[3])]], [[(s, l) for _, _, s, l in layer] for layer in inner]]
    for target in (0.0, 2.3, 6.1, 11.7, 17.9, max_saving(tree) + 0.1):
        want = _brute_force(groups, alternatives, target)
        got = solve(tree, target)
        if want is None:
            assert got is None
            continue
        loss, choices = got
        # discretisation rounds savings down: never infeasible, at most slightly above the true optimum
        assert want - 1e-9 <= loss <= want + 0.5
        chosen = {c if isinstance(c, str) else c[0]: c for c in choices}
        saving = 0.0
        for layer in layers + inner:
            for n, k, s, l in layer:
                if chosen.get(n) == (n, k):
                    saving += s
        saving += drop[2] if "drop" in chosen else 0.0
        assert saving >= target - 1e-9
        assert ("drop" in chosen) != any(f"m{i}" in chosen for i in range(2))  # exactly one alternative


def test_exact_on_a_hand_made_tree():
    tree = AllOf([_layer("a", [(3, 1.0), (5, 3.0)]), _layer("b", [(4, 0.5), (6, 2.5)]),
                  OneOf([Option(9, 2.0, "drop"), AllOf([_layer("c", [(2, 0.1)])])])])
    assert solve(tree, 0) == (0.0, [("a", None), ("b", None), ("c", None)])
    assert solve(tree, 5.5) == (pytest.approx(0.6), [("a", None), ("b", 0), ("c", 0)])
    assert solve(tree, 12.5) == (pytest.approx(2.5), [("a", None), ("b", 0), "drop"])
    assert solve(tree, 15.5) == (pytest.approx(3.5), [("a", 0), ("b", 0), "drop"])
    assert solve(tree, 20.5) is None and max_saving(tree) == 20
