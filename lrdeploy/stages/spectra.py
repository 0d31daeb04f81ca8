"""The report's spectra: a layer's weight singular values² beside its output features' eigenvalues, the picture of
why features are low-rank while weights are not (DESIGN §4), for a few layers of the model."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from lrdeploy.lowrank.decompose import Decomposition, FeaturePca, descending_eigvals, output_spectrum, solve_dtype
from lrdeploy.lowrank.moments import Moments
from lrdeploy.passes.linear_layers import LinearLayer

SPECTRUM_LAYERS = 4


def spectra(eligible: list[LinearLayer], moments: dict[str, Moments] | None,
            decompositions: Mapping[str, Decomposition] | None = None) -> dict[str, dict[str, list[float]]]:
    """Weight singular values² beside output-feature eigenvalues for a few layers (first, widest, last):
    the picture of why features are low-rank while weights are not."""
    if moments is None:
        return {}
    return {layer.name: layer_spectra(layer, moments, decompositions or {}) for layer in spectrum_layers(eligible)}


def spectrum_layers(eligible: list[LinearLayer]) -> list[LinearLayer]:
    """The few layers whose spectra the report plots: the first, the widest out and in, the last."""
    if not eligible:
        return []
    picks = [eligible[0], max(eligible, key=lambda l: l.d_out), max(eligible, key=lambda l: l.d_in), eligible[-1]]
    return list({layer.name: layer for layer in picks}.values())[:SPECTRUM_LAYERS]


def layer_spectra(layer: LinearLayer, moments: dict[str, Moments], decompositions: Mapping[str, Decomposition]
                  ) -> dict[str, list[float]]:
    """One layer's weight singular values² and output-feature eigenvalues, rounded for the report."""
    weight = np.asarray(layer.weight, np.float64)
    return {"weight": squared_singular_values(layer.weight).round(8).tolist(),
            "feature": feature_spectrum(layer, weight, moments, decompositions).round(8).tolist()}


def squared_singular_values(weight: np.ndarray) -> np.ndarray:
    """σ² of `weight`, descending: the eigenvalues of its smaller Gram matrix (a third of an SVD's time on a 4096²
    layer, 3.8 s against 11.9 s here; a plot does not need the last digits of the smallest values), formed and
    solved in the precision of the layer's feature PCA (solve_dtype: float32 from 2048 wide, 1.7 s)."""
    weight = np.asarray(weight, solve_dtype(min(weight.shape)))
    return descending_eigvals(weight.T @ weight if weight.shape[0] >= weight.shape[1] else weight @ weight.T)


def feature_spectrum(layer: LinearLayer, weight: np.ndarray, moments: dict[str, Moments],
                     decompositions: Mapping[str, Decomposition]) -> np.ndarray:
    """The eigenvalues of `layer`'s output covariance, descending: its feature PCA's, else from its input."""
    solved = decompositions.get(layer.name)
    if isinstance(solved, FeaturePca):
        return solved.energies
    return output_spectrum(moments[layer.input_name], weight)


