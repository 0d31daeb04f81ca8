"""Narrower value heads: each attention head's value/output pair shrunk from head_dim to r (numpy only).

Head h adds its context c_h = softmax(Q_h·K_hᵀ)·(X·W_v^h + b_v^h) through W_o^h to the output. Each row of attention
weights sums to 1, so c_h = c̃_h + b_v^h with c̃_h = softmax(·)·X·W_v^h: the value bias folds into the output bias
exactly (b_o′ = b_o + b_v·W_o) and c̃_h is linear in W_v^h, so c̃_h·U = softmax(·)·X·(W_v^h·U) for any U [h_d, r].
With S_h = E[c̃_h c̃_hᵀ] (from the context's calibration moments), the best rank-r replacement of c̃_h·W_o^h is

    S_h^½·W_o^h = P·Σ·Qᵀ (SVD)   ⇒   W_v′^h = W_v^h·S_h^-½·P_r  [d, r],   W_o′^h = Σ_r·Q_rᵀ  [r, d_out]

(feature PCA of the head's output contribution), exact whenever c̃_h spans at most r dimensions (e.g. W_v^h of
rank ≤ r). Heads are fitted one by one; Q and K keep their head size, so the attention weights do not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lrdeploy.lowrank.moments import Moments

RIDGE = 1e-6  # damping of S_h's inverse square root, relative to its mean eigenvalue


@dataclass(frozen=True)
class ValueCut:
    """Every head's value width cut to `rank`: V's weight [d, heads·rank] (no bias: folded into O's), O's weight
    [heads·rank, d_out] and bias [d_out], and the share of the heads' output energy the cut leaves out."""

    rank: int
    value_weight: np.ndarray
    output_weight: np.ndarray
    output_bias: np.ndarray
    lost_energy: float


def shrink_value_heads(moments: Moments, value_weight: np.ndarray, value_bias: np.ndarray | None,
                       output_weight: np.ndarray, output_bias: np.ndarray | None, heads: int, rank: int,
                       ridge: float = RIDGE) -> ValueCut:
    """The rank-`rank` value/output pair of each of `heads` heads (`moments`: the context's, O's input)."""
    w_v, w_o = np.asarray(value_weight, np.float64), np.asarray(output_weight, np.float64)
    head_dim = w_v.shape[1] // heads
    if not 0 < rank <= head_dim:
        raise ValueError(f"rank {rank} is outside 1..{head_dim} (the head size)")
    bias = np.zeros(w_o.shape[1]) if output_bias is None else np.asarray(output_bias, np.float64)
    second = moments.gram / max(moments.count, 1.0)
    if value_bias is not None:  # moments of c̃ = c − b_v
        b_v, mean = np.asarray(value_bias, np.float64), moments.mean
        second = second - np.outer(b_v, mean) - np.outer(mean, b_v) + np.outer(b_v, b_v)
        bias = bias + b_v @ w_o
    new_v, new_o, kept, total = [], [], 0.0, 0.0
    for head in range(heads):
        columns = slice(head * head_dim, (head + 1) * head_dim)
        values, vectors = np.linalg.eigh((second[columns, columns] + second[columns, columns].T) / 2.0)
        values = np.clip(values, 0.0, None) + ridge * max(float(values.mean()), 1e-12)
        left, sigma, right = np.linalg.svd((vectors * values ** 0.5) @ vectors.T @ w_o[columns], full_matrices=False)
        new_v.append(w_v[:, columns] @ (vectors / values ** 0.5) @ vectors.T @ left[:, :rank])
        new_o.append(sigma[:rank, None] * right[:rank])
        kept, total = kept + float(np.sum(sigma[:rank] ** 2)), total + float(np.sum(sigma ** 2))
    lost = 0.0 if total <= 0 else max(0.0, 1.0 - kept / total)
    return ValueCut(rank, np.concatenate(new_v, axis=1), np.concatenate(new_o, axis=0), bias, lost)
