"""Multiple-choice knapsack over a tree of options: the least total loss whose total saving reaches a target.

A plan is a tree. An `Option` is a leaf: what it saves (milliseconds or parameters), what it costs in accuracy,
and what it means (`choice`). `OneOf` takes exactly one child (a layer's ranks; an FFN kept dense, narrowed or
split), `AllOf` takes every child (the layers of a block; the blocks of a model). Savings are discretised into
`bins` steps of target / bins, rounded down (a plan the solver accepts reaches the target with its real
savings); each node's table f[s] is the least loss reaching at least s steps, saturating at the target:

    Option:  f[s] = loss if s ≤ steps(saving) else ∞
    OneOf:   f[s] = min over children c of f_c[s]
    AllOf:   f[s] = min over t of f_a[t] + f_b[max(s − t, 0)]      (folded over the children, a (min, +) product)

The answer is f_root[bins] and the choices that reach it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import numpy as np

BINS = 2000


@dataclass(frozen=True)
class Option:
    saving: float
    loss: float
    choice: object


@dataclass
class OneOf:
    children: list["Node"]


@dataclass
class AllOf:
    children: list["Node"]


Node = Union[Option, OneOf, AllOf]
Table = tuple[np.ndarray, Callable[[int], list]]  # f[s], and the choices behind f[s]


def max_saving(node: Node) -> float:
    """The largest saving any choice in `node` reaches."""
    if isinstance(node, Option):
        return node.saving
    savings = [max_saving(child) for child in node.children]
    return (max(savings) if isinstance(node, OneOf) else sum(savings)) if savings else 0.0


def _table(node: Node, unit: float, bins: int) -> Table:
    steps = np.arange(bins + 1)
    if isinstance(node, Option):
        reach = bins if unit <= 0 else min(bins, int(np.floor(node.saving / unit + 1e-9)))
        return np.where(steps <= reach, node.loss, np.inf), lambda s: [node.choice]
    tables = [_table(child, unit, bins) for child in node.children]
    if isinstance(node, OneOf):
        stacked = np.stack([table for table, _ in tables])
        best = np.argmin(stacked, axis=0)
        return stacked[best, steps], lambda s: tables[int(best[s])][1](s)
    result: Table = (np.where(steps == 0, 0.0, np.inf), lambda s: [])
    for child in tables:
        result = _product(result, child, bins)
    return result


def _product(left: Table, right: Table, bins: int) -> Table:
    """f[s] = min_t left[t] + right[max(s − t, 0)] and the split t behind each s."""
    (a, choose_a), (b, choose_b) = left, right
    steps = np.arange(bins + 1)
    best = np.full(bins + 1, np.inf)
    split = np.zeros(bins + 1, np.int64)
    for t in np.flatnonzero(np.isfinite(a)):
        candidate = a[t] + b[np.maximum(steps - t, 0)]
        better = candidate < best
        best[better], split[better] = candidate[better], t
    return best, lambda s: choose_a(int(split[s])) + choose_b(max(s - int(split[s]), 0))


def solve(tree: Node, target: float, bins: int = BINS) -> tuple[float, list] | None:
    """The least total loss over choices whose savings sum to at least `target`, and those choices (one per
    Option taken); None when no choice reaches the target."""
    bins = bins if target > 0 else 0
    table, choose = _table(tree, target / bins if bins else 0.0, bins)
    if not np.isfinite(table[bins]):
        return None
    return float(table[bins]), choose(bins)
