"""The least-squares maths of the error-aware refit (numpy only; `stages.refit` collects the moments).

Given joint moments of a source x̃ (what a layer sees in the compressed model) and a target y (what the
original model's layer outputs at the same positions):

- `second`: keep the first factor A, solve B′, c′ = argmin E ‖ z·B′ + c′ − y ‖² with z = x̃·A;
- `both` (reduced-rank regression): M = Cov[x̃]⁻¹·Cov[x̃, y] (ridge), then project its fitted outputs on their
  top-k principal directions V_k: A′ = M·V_k, B′ = V_kᵀ. Without upstream error this is feature PCA.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lrdeploy.lowrank.decompose import LowRankFactors
from lrdeploy.lowrank.moments import JointMoments

REFIT_MODES = ("second", "both")


@dataclass
class RidgeFit:
    """y ≈ x·coefficients + (y_mean − x_mean·coefficients), with the source's centred covariance."""

    coefficients: np.ndarray
    source_cov: np.ndarray
    source_mean: np.ndarray
    target_mean: np.ndarray

    def bias(self, product: np.ndarray) -> np.ndarray:
        """The bias that keeps the target mean for the map `product` (a refit coefficients matrix)."""
        return self.target_mean - self.source_mean @ product


def ridge_fit(moments: JointMoments, ridge: float) -> RidgeFit:
    """Ridge least squares of the target on the source; `ridge` is relative to the source's mean variance."""
    cov = moments.source.covariance
    damping = ridge * max(float(np.trace(cov)) / cov.shape[0], 1e-12)
    coefficients = np.linalg.solve(cov + damping * np.eye(cov.shape[0]), moments.cross_covariance)
    return RidgeFit(coefficients, cov, moments.source.mean, moments.target_mean)


def solve_second_factor(first: np.ndarray, moments: JointMoments, ridge: float) -> LowRankFactors:
    """B′, c′ given Z = X̃·A (moments of z and y)."""
    fit = ridge_fit(moments, ridge)
    return LowRankFactors(first, fit.coefficients, fit.bias(fit.coefficients))


def solve_both_factors(rank: int, moments: JointMoments, ridge: float) -> LowRankFactors:
    """Reduced-rank ridge regression of y on x̃ (moments of x̃ and y): rank-`rank` factors and bias."""
    fit = ridge_fit(moments, ridge)
    fitted = fit.coefficients.T @ fit.source_cov @ fit.coefficients
    eigenvalues, eigenvectors = np.linalg.eigh((fitted + fitted.T) / 2)
    basis = eigenvectors[:, np.argsort(eigenvalues)[::-1][:rank]]
    first, second = fit.coefficients @ basis, basis.T.copy()
    return LowRankFactors(first, second, fit.bias(first @ second))
