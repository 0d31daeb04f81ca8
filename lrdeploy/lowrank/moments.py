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

    def covariance_as(self, dtype: type) -> np.ndarray:
        """The covariance for a solver in `dtype`: `covariance` itself in float64; otherwise centred in float64 (no
        cancellation) and cast, not symmetrised: a float32 solver's rounding is far above the sums' asymmetry, and
        the symmetrising transpose costs 1.2 s of a 4096² matrix's 1.3 (0.1 s without it)."""
        if dtype == np.float64:
            return self.covariance
        centred = self.gram / max(self.count, 1.0)
        centred -= np.multiply.outer(self.mean, self.mean)
        return centred.astype(dtype)

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


@dataclass(frozen=True)
class JointMoments:
    """Moments of a source stream x together with a target y read at the same positions: x's own moments, Σy
    [d_y] and Σxyᵀ [d, d_y]. What a least-squares fit of y on x needs."""

    source: Moments
    target_total: np.ndarray
    cross_gram: np.ndarray

    @classmethod
    def zeros(cls, dim: int, target_dim: int) -> "JointMoments":
        return cls(Moments.zeros(dim), np.zeros(target_dim, np.float64), np.zeros((dim, target_dim), np.float64))

    def add(self, count: float, total: np.ndarray, gram: np.ndarray, target_total: np.ndarray,
            cross_gram: np.ndarray) -> "JointMoments":
        """Return these moments plus one batch's sums (cast to float64 before adding)."""
        return JointMoments(self.source.add(count, total, gram),
                            self.target_total + np.asarray(target_total, np.float64).reshape(-1),
                            self.cross_gram + np.asarray(cross_gram, np.float64))

    def target_through_linear(self, weight: np.ndarray | None, bias: np.ndarray | None) -> "JointMoments":
        """The joint moments of x and y′ = y·W + b (W None: y′ = y + b), exactly, from those of x and y."""
        total, cross = self.target_total, self.cross_gram
        if weight is not None:
            w = np.asarray(weight, np.float64)
            total, cross = total @ w, cross @ w
        if bias is not None:
            b = np.asarray(bias, np.float64).reshape(-1)
            total, cross = total + self.source.count * b, cross + np.outer(self.source.total, b)
        return JointMoments(self.source, total, cross)

    @property
    def target_mean(self) -> np.ndarray:
        """E[y], shape [d_y]."""
        return self.target_total / max(self.source.count, 1.0)

    @property
    def cross_covariance(self) -> np.ndarray:
        """E[xyᵀ] − E[x]E[y]ᵀ, shape [d, d_y]."""
        return self.cross_gram / max(self.source.count, 1.0) - np.outer(self.source.mean, self.target_mean)
