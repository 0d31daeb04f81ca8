"""Low-rank decompositions of one linear layer (DESIGN §4).

Each method computes its decomposition once (an eigen- or singular value problem) and then yields
factors at any rank, so that allocation can read the spectrum and factorization can cut it without
solving twice.

    X ─[W, b]→ Y      ≈      X ─A[d_in,k]→ ─B[k,d_out]→ + c → Y'

The intermediate bias of DESIGN §4 (b₁ = b·Uₖ) is folded into the final bias c, which saves one
elementwise pass over the [tokens, k] intermediate without changing the function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Protocol

import numpy as np
import scipy.linalg

from lrdeploy.errors import InternalError
from lrdeploy.lowrank.moments import Moments

Method = Literal["pca", "svd", "whiten"]
METHODS: tuple[str, ...] = ("pca", "svd", "whiten")

FLOAT32_WIDTH = 2048
"""Feature PCA's eigenproblems at least this wide are formed and solved in float32 (LAPACK's divide and conquer
through scipy.linalg.eigh): on a 4096-wide output covariance 3.3 s instead of 7.3, and its product Wᵀ·Cov·W 1.0 s
instead of 2.5. Only the top of the spectrum is kept, and float32 keeps it: the top-1024 subspace of that matrix
moved by 2·10⁻⁶ (relative, in the projected covariance) and the discarded energy by 5·10⁻⁸ of the total against
float64. Narrower problems (MiniLM, SmolLM2-135M) stay in float64 and keep their figures bit for bit; the builds
with every layer forced to float32 are in docs/scaling.md."""


@dataclass(frozen=True)
class LowRankFactors:
    """Y' = X·first·second + bias; `bias` is None when the layer has none and the method adds none."""

    first: np.ndarray
    second: np.ndarray
    bias: np.ndarray | None

    @property
    def rank(self) -> int:
        return int(self.first.shape[1])

    def dense_weight(self) -> np.ndarray:
        return self.first @ self.second


class Decomposition(Protocol):
    """A solved decomposition: `energies` are the descending spectrum the truncation discards from."""

    energies: np.ndarray

    def factors(self, rank: int) -> LowRankFactors: ...


def _check_rank(rank: int, limit: int) -> None:
    if not 1 <= rank <= limit:
        raise InternalError(f"rank {rank} outside [1, {limit}]")


@dataclass(frozen=True)
class FeaturePca:
    """Project the centred output onto its top-k principal subspace: Y' = μ + (Y − μ)·Uₖ·Uₖᵀ.

    Held compactly, for any rank up to `max_rank`: the first factor at that rank, W·U, and the basis U (in the
    weight's precision, at least float32: the precision the factors are written in), and the projected bias term
    (μ − b)·U in float64. A rank-k split is a prefix of their columns; the weight itself is not kept."""

    projected_weight: np.ndarray  # W·U [d_in, max_rank]
    basis: np.ndarray  # U [d_out, max_rank]
    output_mean: np.ndarray
    projected_bias: np.ndarray  # (μ − b)·U [max_rank] (μ·U without a bias)
    energies: np.ndarray  # the descending spectrum (d_out values) allocation and reports read; see leading_eigh

    @property
    def max_rank(self) -> int:
        return int(self.basis.shape[1])

    def factors(self, rank: int) -> LowRankFactors:
        _check_rank(rank, self.max_rank)
        basis = self.basis[:, :rank]
        bias = self.output_mean - self.projected_bias[:rank] @ basis.T.astype(np.float64)
        return LowRankFactors(self.projected_weight[:, :rank], basis.T, bias)  # views: written once, not copied


def feature_pca(weight: np.ndarray, bias: np.ndarray | None, output_mean: np.ndarray, eigenvectors: np.ndarray,
                energies: np.ndarray, max_rank: int) -> FeaturePca:
    """The compact FeaturePca of a layer from its output covariance's eigenvectors (descending, float64)."""
    storage = np.result_type(np.asarray(weight).dtype, np.float32)
    basis = np.ascontiguousarray(eigenvectors[:, :max_rank])
    projector_bias = output_mean if bias is None else output_mean - bias
    projected = (np.asarray(weight, basis.dtype) @ basis).astype(storage)  # in the precision the basis was solved in
    return FeaturePca(projected, basis.astype(storage), output_mean, projector_bias @ basis, energies)


@dataclass(frozen=True)
class WeightSvd:
    """Truncated SVD of the weight alone, W ≈ Uₖ·Σₖ·Vₖᵀ; needs no data (the baseline)."""

    left: np.ndarray
    singular_values: np.ndarray
    right: np.ndarray
    bias: np.ndarray | None

    @property
    def energies(self) -> np.ndarray:
        return self.singular_values**2

    def factors(self, rank: int) -> LowRankFactors:
        _check_rank(rank, self.singular_values.shape[0])
        root = np.sqrt(self.singular_values[:rank])
        return LowRankFactors(self.left[:, :rank] * root, root[:, None] * self.right[:rank], self.bias)


@dataclass(frozen=True)
class WhitenedSvd:
    """Activation-aware SVD (SVD-LLM style): truncate the SVD of Sᵀ·W where S·Sᵀ = Cov[x], map back with
    S⁻ᵀ, and refit the bias so that the output mean is kept: c = E[y] − E[x]·A·B."""

    whitener_t: np.ndarray
    left: np.ndarray
    singular_values: np.ndarray
    right: np.ndarray
    input_mean: np.ndarray
    output_mean: np.ndarray

    @property
    def energies(self) -> np.ndarray:
        return self.singular_values**2

    def factors(self, rank: int) -> LowRankFactors:
        _check_rank(rank, self.singular_values.shape[0])
        first = np.linalg.solve(self.whitener_t, self.left[:, :rank] * self.singular_values[:rank])
        second = self.right[:rank].copy()
        bias = self.output_mean - (self.input_mean @ first) @ second
        return LowRankFactors(first, second, bias)


def _damped_cholesky(covariance: np.ndarray, damping: float) -> np.ndarray:
    """Lower-triangular S with S·Sᵀ = Cov + λI, raising λ until the matrix is positive definite."""
    scale = float(np.mean(np.diag(covariance))) or 1.0
    for attempt in range(8):
        lam = damping * scale * (10.0**attempt)
        try:
            return np.linalg.cholesky(covariance + lam * np.eye(covariance.shape[0]))
        except np.linalg.LinAlgError:
            continue
    raise InternalError("input covariance is not positive definite even with strong damping")


def solve_dtype(width: int) -> type:
    """The precision a feature-PCA eigenproblem of this width is solved in (see FLOAT32_WIDTH)."""
    return np.float32 if width >= FLOAT32_WIDTH else np.float64


def _eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ascending eigenvalues and eigenvectors of a symmetric matrix in its own precision: numpy's solver in float64
    (the figures recorded so far), scipy's divide and conquer in float32 (numpy's float32 solver is no faster than
    its float64 one here)."""
    if matrix.dtype == np.float64:
        return np.linalg.eigh(matrix)
    return scipy.linalg.eigh(matrix, driver="evd", check_finite=False)


def descending_eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, float64, clipped at 0) and eigenvectors (matching columns, in the matrix's
    precision) of a symmetric matrix."""
    values, vectors = _eigh(matrix)
    order = np.argsort(values)[::-1]
    return np.clip(values[order].astype(np.float64), 0.0, None), vectors[:, order]


def leading_eigh(matrix: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """descending_eigh for a float32 matrix when only `count` eigenvectors are kept: LAPACK's MRRR solver (evr) for
    the leading `count` pairs only (2.6 s instead of 3.9 for the top 1024 of 4096). It gives no other eigenvalue,
    so the rest of the trace is spread evenly over the remaining places: every sum of the spectrum from a rank
    ≤ `count` on — the discarded energy allocation reads at the ranks it can choose — is exact; the individual
    values past `count` are not (the report's plotted layers are solved whole)."""
    width = matrix.shape[0]
    if matrix.dtype == np.float64 or count >= width:
        return descending_eigh(matrix)
    values, vectors = scipy.linalg.eigh(matrix, subset_by_index=[width - count, width - 1], driver="evr",
                                        check_finite=False)
    leading = np.clip(values[::-1].astype(np.float64), 0.0, None)
    rest = max(float(np.trace(matrix, dtype=np.float64)) - float(leading.sum()), 0.0)
    return np.concatenate([leading, np.full(width - count, rest / (width - count))]), vectors[:, ::-1]


def descending_eigvals(matrix: np.ndarray) -> np.ndarray:
    """descending_eigh's eigenvalues alone (no eigenvectors: under half the time)."""
    if matrix.dtype == np.float64:
        values = np.linalg.eigvalsh(matrix)
    else:
        values = scipy.linalg.eigh(matrix, eigvals_only=True, driver="evd", check_finite=False)
    return np.clip(values[::-1].astype(np.float64), 0.0, None)


def _output_mean(moments: Moments, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """E[y] = E[x]·W + b, in float64."""
    return moments.mean @ w + (0.0 if b is None else b)


def _output_root(moments: Moments, w: np.ndarray) -> np.ndarray:
    """M = Lᵀ·W [d_in, d_out] with L·Lᵀ = Cov[x]: the output covariance Wᵀ·Cov[x]·W is Mᵀ·M. In w's precision."""
    eigenvalues, basis = _eigh(moments.covariance_as(w.dtype))
    return (basis * np.sqrt(np.clip(eigenvalues, 0.0, None))).T @ w


def output_spectrum(moments: Moments, weight: np.ndarray) -> np.ndarray:
    """The eigenvalues of a layer's output covariance, descending, from its input's d_in × d_in statistics (d_out
    of them; past d_in they are 0): what the report plots, never a d_out × d_out matrix."""
    w = np.asarray(weight, np.float64)
    values = np.linalg.svd(_output_root(moments, w), compute_uv=False) ** 2
    return np.pad(values, (0, w.shape[1] - len(values)))


def _input_side_pca(weight: np.ndarray, w: np.ndarray, b: np.ndarray | None, moments: Moments,
                    max_rank: int, whole_spectrum: bool) -> FeaturePca:
    """Feature PCA of a layer wider out than in (an FFN's up projection, an LM head: 576 → 49152, whose output
    covariance would be 19 GB of float64) from d_in × d_in matrices only. With Cov[x] = L·Lᵀ the output covariance
    is Wᵀ·Cov[x]·W = Mᵀ·M for M = Lᵀ·W [d_in, d_out]: its eigenvalues are those of M·Mᵀ = U·S²·Uᵀ (at most d_in
    are non-zero) and its eigenvectors M's right singular vectors Mᵀ·U·S⁻¹, of which only `max_rank` are formed.
    The same projector as the d_out × d_out eigenproblem at d_in²·d_out cost instead of d_out³ (TinyLlama's
    2048 → 5632 projections: a fifth of the time). Solved in solve_dtype(d_in)."""
    root = _output_root(moments, np.asarray(weight, solve_dtype(w.shape[0])))
    gram = root @ root.T
    energies, left = descending_eigh(gram) if whole_spectrum else leading_eigh(gram, max_rank)
    singular = np.sqrt(energies[:max_rank]).astype(root.dtype)
    basis = (root.T @ left[:, :max_rank]) / np.where(singular > 0, singular, 1.0)
    return feature_pca(weight, b, _output_mean(moments, w, b), basis,
                       np.pad(energies, (0, w.shape[1] - len(energies))), max_rank)


def decompose(
    method: Method,
    weight: np.ndarray,
    bias: np.ndarray | None,
    input_moments: Moments | None = None,
    damping: float = 1e-5,
    max_rank: int | None = None,
    whole_spectrum: bool = True,
) -> Decomposition:
    """Solve one layer's decomposition (in float64; feature PCA from FLOAT32_WIDTH in float32). `input_moments` is
    required by pca and whiten. `max_rank`: the largest rank the build can ask of it (default min(d_in, d_out));
    feature PCA keeps only that many vectors, and in float32 without `whole_spectrum` solves only for them (the
    bounded build, whose uniform ranks read no spectrum, for the layers the report does not plot; leading_eigh)."""
    w = np.asarray(weight, np.float64)
    b = None if bias is None else np.asarray(bias, np.float64).reshape(-1)
    if method == "svd":
        left, sv, right = np.linalg.svd(w, full_matrices=False)
        return WeightSvd(left, sv, right, b)
    if input_moments is None:
        raise InternalError(f"method {method!r} needs calibration statistics")
    if method == "pca":
        max_rank = min(w.shape) if max_rank is None else min(max_rank, *w.shape)
        if w.shape[1] > w.shape[0]:  # its output covariance has rank ≤ d_in: solved on the input side
            return _input_side_pca(np.asarray(weight), w, b, input_moments, max_rank, whole_spectrum)
        if solve_dtype(w.shape[1]) == np.float32:  # Wᵀ·Cov[x]·W from the centred input: no cancellation in float32
            w32 = np.asarray(weight, np.float32)
            covariance = w32.T @ input_moments.covariance_as(np.float32) @ w32
            energies, vectors = descending_eigh(covariance) if whole_spectrum else leading_eigh(covariance, max_rank)
            return feature_pca(np.asarray(weight), b, _output_mean(input_moments, w, b), vectors[:, :max_rank],
                               energies, max_rank)
        out = input_moments.through_linear(w, b)
        energies, vectors = descending_eigh(out.covariance)
        return feature_pca(np.asarray(weight), b, out.mean, vectors[:, :max_rank], energies, max_rank)
    if method == "whiten":
        whitener = _damped_cholesky(input_moments.covariance, damping)
        left, sv, right = np.linalg.svd(whitener.T @ w, full_matrices=False)
        return WhitenedSvd(whitener.T, left, sv, right, input_moments.mean, _output_mean(input_moments, w, b))
    raise InternalError(f"unknown method {method!r}")


def planned_factors(decompositions: Mapping[str, Decomposition], ranks: Mapping[str, int | None]
                    ) -> dict[str, LowRankFactors]:
    """The factors of every layer a plan splits (rank not None), by layer name."""
    return {name: decompositions[name].factors(rank) for name, rank in ranks.items() if rank is not None}
