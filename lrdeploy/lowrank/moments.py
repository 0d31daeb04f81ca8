"""First and second moments of a feature stream, accumulated in float64.

Calibration sums Σx and Σxxᵀ over (weighted) token positions. Because a linear layer is exactly
Y = X·W + b, the moments of its output follow from those of its input, so one input Gram matrix
serves every layer that reads the same tensor (Q, K and V share one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Moments:
    """Running sums over `count` positions: `total` = Σx (shape [d]) and `gram` = Σxxᵀ (shape [d, d])."""

    count: float
    total: np.ndarray
    gram: np.ndarray

    @classmethod
    def zeros(cls, dim: int) -> "Moments":
        return cls(0.0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    @property
    def dim(self) -> int:
        return int(self.total.shape[0])

    def add(self, count: float, total: np.ndarray, gram: np.ndarray) -> "Moments":
        """Return these moments plus one batch's sums (cast to float64 before adding)."""
        return Moments(
            self.count + float(count),
            self.total + np.asarray(total, np.float64).reshape(-1),
            self.gram + np.asarray(gram, np.float64),
        )

    @property
    def mean(self) -> np.ndarray:
        """E[x], shape [d]."""
        return self.total / max(self.count, 1.0)

    @property
    def covariance(self) -> np.ndarray:
        """Centred covariance E[xxᵀ] − E[x]E[x]ᵀ, symmetrised, shape [d, d]."""
        mean = self.mean
        cov = self.gram / max(self.count, 1.0) - np.outer(mean, mean)
        return (cov + cov.T) / 2.0

    def through_linear(self, weight: np.ndarray, bias: np.ndarray | None) -> "Moments":
        """Moments of y = x·W + b, computed exactly from those of x."""
        w = np.asarray(weight, np.float64)
        total_y = self.total @ w
        gram_y = w.T @ self.gram @ w
        if bias is not None:
            b = np.asarray(bias, np.float64).reshape(-1)
            cross = np.outer(total_y, b)
            gram_y = gram_y + cross + cross.T + self.count * np.outer(b, b)
            total_y = total_y + self.count * b
        return Moments(self.count, total_y, gram_y)
