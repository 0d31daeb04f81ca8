"""A narrower FFN: which of its f intermediate neurons to keep, and the down projection refit so that the block
output is reproduced from the kept ones, from calibration moments of the activation h alone (numpy only).

For the down projection y = h·W + b (W = W_down, [f, d]) and a kept set S of neurons, ridge least squares gives

    W′ = (C_SS + λI)⁻¹ · C_S: · W,     b′ = E[y] − E[h_S]·W′,     C = Cov[h]   (MoDeGPT / Nyström style)

and leaves the error tr(Wᵀ·C·W) − tr((C_S:·W)ᵀ·W′). Neurons are chosen greedily to remove most of that error:
a pivoted Cholesky of C, each step taking the neuron whose residual column, carried through W, is largest. When
the kept neurons span the others (a removed neuron is a linear function of kept ones), the refit is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lrdeploy.lowrank.moments import Moments

EPS = 1e-12
RIDGE = 1e-6  # damping of the refit, relative to the kept features' mean variance


@dataclass(frozen=True)
class NeuronCut:
    """The neurons kept (ascending) and the down projection's refit weight [k, d] and bias [d]."""

    keep: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    residual: float  # the least-squares error left, E‖y − y′‖², per position


class _Refits:
    """Ridge refits of y = h·W from subsets S of h's features, sharing what every subset needs: C·W (its rows S
    are C_S:·W) and tr(Wᵀ·C·W). A refit is one k×k solve, W′ = (C_SS + λI)⁻¹·(C·W)_S, and its error is
    tr(Wᵀ·C·W) − Σ (C·W)_S ∘ W′, so no f×f matrix is formed per subset."""

    def __init__(self, cov: np.ndarray, weight: np.ndarray, ridge: float):
        self.cov, self.ridge = cov, ridge
        self.carried = cov @ weight
        self.total = float(np.sum(weight * self.carried))

    def solve(self, keep: np.ndarray) -> tuple[np.ndarray, float]:
        """(W′ [k, d], the error it leaves) for the features `keep`."""
        block = self.cov[np.ix_(keep, keep)]
        damping = self.ridge * max(float(np.trace(block)) / max(len(keep), 1), EPS)
        rows = self.carried[keep]
        refit = np.linalg.solve(block + damping * np.eye(len(keep)), rows)
        return refit, self.total - float(np.sum(rows * refit))


def neuron_order(cov: np.ndarray, weight: np.ndarray, count: int) -> np.ndarray:
    """The first `count` neurons chosen greedily to minimise the refit's error tr(Wᵀ·C_resid·W), in the order
    chosen: any prefix is the greedy choice of that many (so one run serves every width a plan considers).

    A left-looking pivoted Cholesky: only the residual's diagonal, C_resid·W and the factor's columns are kept
    (the pivot's residual column is C's column less the factor's part), not the f×f residual itself."""
    cov = np.asarray(cov, np.float64)
    diag = np.diag(cov).copy()
    carried = cov @ np.asarray(weight, np.float64)  # C_resid·W, updated by rank one per step
    factor = np.zeros((count, cov.shape[0]))  # rows: the Cholesky columns of the chosen neurons
    floor = EPS * max(float(np.trace(cov)), EPS)
    chosen: list[int] = []
    for step in range(count):
        gains = np.where(diag > floor, (carried ** 2).sum(1) / np.maximum(diag, EPS), -1.0)
        gains[chosen] = -np.inf
        pick = int(np.argmax(gains))
        if gains[pick] < 0:  # the rest is already spanned: keep the largest remaining neurons by variance
            rest = [j for j in np.argsort(-np.diag(cov)) if j not in chosen]
            chosen += rest[: count - len(chosen)]
            break
        column = cov[:, pick] - factor[:step, pick] @ factor[:step]
        root = np.sqrt(column[pick])
        factor[step] = column / root
        diag -= factor[step] ** 2
        carried -= np.outer(factor[step], carried[pick] / root)
        chosen.append(pick)
    return np.asarray(chosen, np.int64)


def cut_neurons(moments: Moments, weight: np.ndarray, bias: np.ndarray | None, count: int,
                ridge: float = RIDGE) -> NeuronCut:
    """Keep `count` of the activation's neurons (moments of h over calibration positions) and refit W, b."""
    return neuron_cuts(moments, weight, bias, [count], ridge)[count]


def neuron_cuts(moments: Moments, weight: np.ndarray, bias: np.ndarray | None, counts: list[int],
                ridge: float = RIDGE) -> dict[int, NeuronCut]:
    """`cut_neurons` for several counts from one greedy order (each count keeps a prefix of it)."""
    w = np.asarray(weight, np.float64)
    b = np.zeros(w.shape[1]) if bias is None else np.asarray(bias, np.float64)
    order = neuron_order(moments.covariance, w, max(counts, default=0))
    refits = _Refits(moments.covariance, w, ridge)
    return {count: _cut(moments, refits, w, b, np.sort(order[:count])) for count in counts}


def _cut(moments: Moments, refits: _Refits, weight: np.ndarray, bias: np.ndarray, keep: np.ndarray) -> NeuronCut:
    """The NeuronCut reproducing h·W + b from the features `keep` of h."""
    refit, residual = refits.solve(keep)
    return NeuronCut(keep, refit, moments.mean @ weight + bias - moments.mean[keep] @ refit, residual)


def cut_groups(moments: Moments, weight: np.ndarray, bias: np.ndarray | None, groups: int, count: int,
               ridge: float = RIDGE) -> tuple[list[int], NeuronCut]:
    """Keep `count` of `groups` equal, contiguous blocks of the input's features (attention heads: the context's
    head_dim-wide slices) and refit W, b as `cut_neurons` does. Groups are removed one at a time, each time the
    one whose removal leaves the smallest refit error (backward elimination; exact for groups that contribute
    nothing or that the kept ones span)."""
    return group_cuts(moments, weight, bias, groups, [count], ridge)[count]


def group_cuts(moments: Moments, weight: np.ndarray, bias: np.ndarray | None, groups: int, counts: list[int],
               ridge: float = RIDGE) -> dict[int, tuple[list[int], NeuronCut]]:
    """`cut_groups` for several counts from one elimination (each count's kept groups are the elimination's state
    when that many remain)."""
    w = np.asarray(weight, np.float64)
    b = np.zeros(w.shape[1]) if bias is None else np.asarray(bias, np.float64)
    size = w.shape[0] // groups
    refits = _Refits(moments.covariance, w, ridge)
    kept = list(range(groups))

    def features(heads: list[int]) -> np.ndarray:
        return np.concatenate([np.arange(h * size, (h + 1) * size) for h in heads])

    result = {}
    for count in sorted(set(counts), reverse=True):
        while len(kept) > count:
            errors = [refits.solve(features([h for h in kept if h != g]))[1] for g in kept]
            kept.remove(kept[int(np.argmin(errors))])
        result[count] = (list(kept), _cut(moments, refits, w, b, features(kept)))
    return result
