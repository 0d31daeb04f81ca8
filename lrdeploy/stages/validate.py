"""Validation: original vs compressed model on held-out inputs, through Polygraphy's Comparator.

Polygraphy runs both models (ONNX Runtime, CPU) on the same feeds and checks its elementwise
tolerances (`atol`, `rtol`); on top of that we compute the figures that matter for compression, per
output: cosine similarity per sample (mean and 5th percentile), relative L2 error and max abs error, for
embedding-like outputs the top-k nearest-neighbour agreement over the evaluation samples, and for a causal LM's
logits perplexity, next-token agreement and KL (`stages.next_token`). Batches are compared one at a time, so
memory does not grow with the evaluation set, and a batch whose outputs would pass `MAX_RUN_OUTPUT_BYTES` runs in
parts (an LM's logits are vocabulary-wide: 16 windows of 128 tokens over 49152 words are 400 MB).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from lrdeploy.report.model import AccuracyReport, OutputAccuracy
from lrdeploy.runtime.onnxruntime import refusals_named
from lrdeploy.stages.classes import ClassScores, is_class_logits
from lrdeploy.stages.next_token import NextTokenScores, is_next_token_output

MAX_RUN_OUTPUT_BYTES = 64 * 2**20
"""The most output bytes one validation run may produce, where the batch axis is dynamic: each run's outputs are
held three times (the original's, read back from disk; the compressed model's; ONNX Runtime's own buffers)."""


def per_sample_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample (axis 0) of `a` and `b`, flattened, in float64; 1 where a norm is 0. One
    sample is copied to float64 at a time (a batch of an LM's logits would be gigabytes)."""
    cosines = np.ones(a.shape[0])
    for index, (x, y) in enumerate(zip(a, b)):
        x, y = np.asarray(x, np.float64).reshape(-1), np.asarray(y, np.float64).reshape(-1)
        denom = float(np.linalg.norm(x) * np.linalg.norm(y))
        if denom > 0:
            cosines[index] = float(x @ y) / denom
    return cosines


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


class OutputComparison:
    """Running comparison of one output over batches: per-sample cosines, error sums, the samples of per-sample
    vector outputs (for neighbour agreement) and, for a causal LM's logits, the next-token figures. Nothing
    vocabulary-wide is kept past its batch."""

    def __init__(self) -> None:
        self.cosines: list[np.ndarray] = []
        self.err_sq = self.ref_sq = self.max_abs = 0.0
        self.vectors: tuple[list[np.ndarray], list[np.ndarray]] | None = ([], [])
        self.next_token: NextTokenScores | None = None
        self.classes: ClassScores | None = None

    def add(self, name: str, reference: np.ndarray, candidate: np.ndarray, feed: dict[str, np.ndarray],
            mask_name: str | None) -> None:
        self.cosines.append(per_sample_cosine(reference, candidate))
        for ref, cand in zip(reference, candidate):  # one sample's float64 copies at a time (logits are wide)
            difference = ref.astype(np.float64) - cand
            self.err_sq += float(np.sum(difference ** 2))
            self.ref_sq += float(np.sum(ref.astype(np.float64) ** 2))
            self.max_abs = max(self.max_abs, float(np.max(np.abs(difference))) if difference.size else 0.0)
        if is_class_logits(name, reference):  # a label, not a vector with neighbours
            self.classes = self.classes or ClassScores()
            self.classes.add(reference, candidate)
            self.vectors = None
        elif self.vectors is not None and reference.ndim == 2:
            self.vectors[0].append(reference)
            self.vectors[1].append(candidate)
        else:
            self.vectors = None
        if is_next_token_output(name, reference, feed):
            self.next_token = self.next_token or NextTokenScores()
            self.next_token.add(reference, candidate, feed["input_ids"], feed.get(mask_name) if mask_name else None)

    def result(self, neighbours: int) -> OutputAccuracy:
        """The output's figures; neighbour agreement for per-sample vectors (2-D, e.g. sentence embeddings) over
        more than `neighbours` samples."""
        cosines = np.concatenate(self.cosines)
        agreement = None
        if self.vectors is not None and sum(r.shape[0] for r in self.vectors[0]) > neighbours > 0:
            agreement = neighbour_agreement(np.concatenate(self.vectors[0]), np.concatenate(self.vectors[1]), neighbours)
        return OutputAccuracy(
            cosine_mean=float(np.mean(cosines)),
            cosine_p5=float(np.percentile(cosines, 5)),
            rel_l2=float(np.sqrt(self.err_sq / self.ref_sq)) if self.ref_sq > 0 else float(np.sqrt(self.err_sq)),
            max_abs=self.max_abs,
            topk_agreement=agreement,
            next_token=self.next_token.result() if self.next_token else None,
            classes=self.classes.result() if self.classes else None,
        )


def per_sample(reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray]
               ) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """The two models' outputs a sample at a time (views), when every output has the batch first; else whole.
    Polygraphy's elementwise check makes several copies of what it compares: of a batch of an LM's logits
    (16 × 128 × 49152) that would be gigabytes."""
    batches = {value.shape[0] if value.ndim else None for value in reference.values()}
    if len(batches) != 1 or None in batches:
        yield dict(reference), dict(outputs)
        return
    for index in range(batches.pop()):
        yield ({name: value[index:index + 1] for name, value in reference.items()},
               {name: value[index:index + 1] for name, value in outputs.items()})


def rows_per_run(runner, feed: dict[str, np.ndarray]) -> int:
    """How many samples one run of `runner` may take for its outputs to stay under `MAX_RUN_OUTPUT_BYTES`: measured
    on `feed`'s first sample. The batch size itself where the model's batch axis is static or the batch has one
    sample."""
    batch = next(iter(feed.values())).shape[0]
    inputs = runner.get_input_metadata(use_numpy_dtypes=False)
    if batch == 1 or any(shape and isinstance(shape[0], int) for _, shape in inputs.values()):
        return batch
    sample_bytes = sum(value.nbytes for value in runner.infer({name: value[:1] for name, value in feed.items()}).values())
    return int(min(batch, max(1, MAX_RUN_OUTPUT_BYTES // max(sample_bytes, 1))))


def in_parts(feeds: list[dict[str, np.ndarray]], rows: int) -> list[dict[str, np.ndarray]]:
    """`feeds` with every batch split into runs of at most `rows` samples (views)."""
    return [{name: value[start:start + rows] for name, value in feed.items()}
            for feed in feeds for start in range(0, next(iter(feed.values())).shape[0], rows)]


def compare_models(
    original: Path, compressed: Path, feeds: Iterable[dict[str, np.ndarray]], atol: float, rtol: float,
    neighbours: int = 10, mask_name: str | None = None,
) -> AccuracyReport:
    """Run both models on `feeds` with Polygraphy, batch by batch, and summarise the differences per output:
    Polygraphy's elementwise check (`atol`, `rtol`) on every batch, and our figures (`OutputComparison`;
    `mask_name` is the attention mask input, for next-token figures over real tokens only). The models run one
    after the other, never both loaded (a big model's validation holds one model's weights): the original's
    outputs wait on disk, a run per file, until the compressed model's are compared with them. Batches with wide
    outputs run in parts (`rows_per_run`)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, IterationResult, RunResults, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    compare = SimpleCompareFunc(atol=atol, rtol=rtol)
    comparisons: dict[str, OutputComparison] = {}
    passed, samples = True, 0
    feeds = list(feeds)
    G_LOGGER.colors = False  # avoids Polygraphy's notice about the optional 'colored' package
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL), refusals_named(), \
            tempfile.TemporaryDirectory(prefix="lrdeploy-validate-") as stored:
        with OnnxrtRunner(SessionFromOnnx(str(original)), name="original") as dense:
            if feeds:
                feeds = in_parts(feeds, rows_per_run(dense, feeds[0]))
            for index, feed in enumerate(feeds):
                np.savez(Path(stored) / f"{index}.npz", **dense.infer(feed))
        with OnnxrtRunner(SessionFromOnnx(str(compressed)), name="compressed") as candidate:
            for index, feed in enumerate(feeds):
                with np.load(Path(stored) / f"{index}.npz", allow_pickle=False) as saved:
                    reference = {name: saved[name] for name in saved.files}
                outputs = candidate.infer(feed)
                for expected, actual in per_sample(reference, outputs):
                    results = RunResults([(name, [IterationResult(result, runner_name=name)])
                                          for name, result in (("original", expected), ("compressed", actual))])
                    passed &= bool(Comparator.compare_accuracy(results, compare_func=compare))
                for name in reference:
                    comparisons.setdefault(name, OutputComparison()).add(
                        name, np.asarray(reference[name]), np.asarray(outputs[name]), feed, mask_name)
                samples += next(iter(feed.values())).shape[0]
    outputs = {name: comparison.result(neighbours) for name, comparison in comparisons.items()}
    return AccuracyReport(samples=samples, passed=passed, atol=atol, rtol=rtol, outputs=outputs, neighbours=neighbours)
