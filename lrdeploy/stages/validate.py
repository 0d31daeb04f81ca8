"""Validation: original vs compressed model on held-out inputs, through Polygraphy's Comparator.

Polygraphy runs both models (ONNX Runtime, CPU) on the same feeds and checks its elementwise
tolerances (`atol`, `rtol`); on top of that we compute the figures that matter for compression, per
output: cosine similarity per sample (mean and 5th percentile), relative L2 error and max abs error, and
for embedding-like outputs the top-k nearest-neighbour agreement over the evaluation samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from lrdeploy.report.model import AccuracyReport, OutputAccuracy
from lrdeploy.runtime.onnxruntime import refusals_named


def per_sample_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample (axis 0) of `a` and `b`, flattened, in float64; 1 where a norm is 0."""
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    return np.where(denom > 0, dots / np.where(denom > 0, denom, 1.0), 1.0)


def neighbour_agreement(reference: np.ndarray, candidate: np.ndarray, k: int) -> float:
    """Mean overlap of each sample's k nearest neighbours (cosine, itself excluded) in the two embedding sets:
    1.0 means retrieval over these samples returns the same neighbours as the original model."""
    def top_k(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        similarity = x @ x.T
        np.fill_diagonal(similarity, -np.inf)
        return np.argpartition(-similarity, k, axis=1)[:, :k]

    ref, cand = top_k(reference), top_k(candidate)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ref, cand)]))


def output_accuracy(reference: list[np.ndarray], candidate: list[np.ndarray], neighbours: int = 10) -> OutputAccuracy:
    """Compression metrics of one output over batches (arrays of each batch paired in order).

    For per-sample vectors (2-D outputs such as sentence embeddings) with more than `neighbours` samples,
    the top-k nearest-neighbour agreement is computed too.
    """
    cosines = np.concatenate([per_sample_cosine(r, c) for r, c in zip(reference, candidate)])
    err_sq = sum(float(np.sum((r.astype(np.float64) - c) ** 2)) for r, c in zip(reference, candidate))
    ref_sq = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
    max_abs = max(float(np.max(np.abs(r.astype(np.float64) - c))) for r, c in zip(reference, candidate))
    agreement = None
    if all(r.ndim == 2 for r in reference) and sum(r.shape[0] for r in reference) > neighbours > 0:
        agreement = neighbour_agreement(np.concatenate(reference), np.concatenate(candidate), neighbours)
    return OutputAccuracy(
        cosine_mean=float(np.mean(cosines)),
        cosine_p5=float(np.percentile(cosines, 5)),
        rel_l2=float(np.sqrt(err_sq / ref_sq)) if ref_sq > 0 else float(np.sqrt(err_sq)),
        max_abs=max_abs,
        topk_agreement=agreement,
    )


def compare_models(
    original: Path, compressed: Path, feeds: Iterable[dict[str, np.ndarray]], atol: float, rtol: float,
    neighbours: int = 10,
) -> AccuracyReport:
    """Run both models on `feeds` with Polygraphy and summarise the differences per output."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    feeds = list(feeds)
    runners = [
        OnnxrtRunner(SessionFromOnnx(str(original)), name="original"),
        OnnxrtRunner(SessionFromOnnx(str(compressed)), name="compressed"),
    ]
    G_LOGGER.colors = False  # avoids Polygraphy's notice about the optional 'colored' package
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL), refusals_named():  # our own table reports the outcome
        results = Comparator.run(runners, data_loader=feeds)
        passed = bool(Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol)))
    (_, reference), (_, candidate) = results[0], results[1]
    names = list(reference[0].keys())
    outputs = {
        name: output_accuracy([np.asarray(it[name]) for it in reference], [np.asarray(it[name]) for it in candidate],
                              neighbours)
        for name in names
    }
    samples = sum(next(iter(feed.values())).shape[0] for feed in feeds)
    return AccuracyReport(samples=samples, passed=passed, atol=atol, rtol=rtol, outputs=outputs, neighbours=neighbours)
