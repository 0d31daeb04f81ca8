"""The language-model figures of a compressed causal LM against its dense original, on held-out windows:

    logits [batch, T, vocab] of both models, input_ids [batch, T], attention_mask [batch, T]
    positions t with a real next token (mask[t] = mask[t+1] = 1), target input_ids[t+1]
        perplexity of each model   exp(mean −log softmax(logits[t])[target])
        top-1 agreement            argmax of the compressed model = argmax of the dense one
        KL(dense ‖ compressed)     Σ_v p_dense(v) (log p_dense(v) − log p_compressed(v)), mean over positions

Cosine of logits says little about a language model (0.92 for a model whose perplexity more than doubled);
these are the figures a user judges one by. Accumulated batch by batch (a vocabulary-wide output is never held
for more than one batch), in float64 one sample at a time."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lrdeploy.report.model import NextTokenAccuracy


def is_next_token_output(name: str, logits: np.ndarray, feed: dict[str, np.ndarray]) -> bool:
    """A causal LM's logits: an output named as exporters name them ("logits"), [batch, T, vocab] over the
    `input_ids` fed ([batch, T]), with every token id fed a valid index of the last axis (a token classifier's few
    labels are not a vocabulary; hidden states [batch, T, d] are not logits, whatever their width)."""
    ids = feed.get("input_ids")
    return ("logit" in name.lower() and ids is not None and logits.ndim == 3 and ids.ndim == 2
            and logits.shape[:2] == ids.shape and ids.size > 0 and int(ids.max()) < logits.shape[2])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def scored_rows(input_ids: np.ndarray, mask: np.ndarray | None) -> list[np.ndarray]:
    """Per sample, the positions whose next token is real (mask[t] = mask[t+1] = 1; every position but the last
    without a mask)."""
    real = np.ones(input_ids.shape, bool) if mask is None else np.asarray(mask) != 0
    scored = real[:, :-1] & real[:, 1:]
    return [np.flatnonzero(row) for row in scored]


class NextTokenReference:
    """The dense model's side of KL(dense ‖ variant) on one batch, computed once for the many variants a plan
    measures against it (sensitivity, structured options): per scored position the dense distribution p and
    Σ p·log p, so that a variant's logits x only need their log-partition:

        KL = Σ_v p log p − Σ_v p·x + log Σ_v exp(x)        (float64 sums, exponentials in float32)
    """

    def __init__(self, dense: np.ndarray, input_ids: np.ndarray, mask: np.ndarray | None):
        self.rows = scored_rows(input_ids, mask)
        self.probabilities = []
        self.neg_entropy = 0.0
        for sample, rows in enumerate(self.rows):
            log_p = log_softmax(dense[sample, rows])
            p = np.exp(log_p)
            self.probabilities.append(p)
            self.neg_entropy += float((p * log_p).sum())
        self.positions = int(sum(rows.size for rows in self.rows))

    def kl_sum(self, logits: np.ndarray) -> float:
        """Σ over the scored positions of KL(dense ‖ the distribution of `logits` [batch, T, vocab])."""
        total = self.neg_entropy
        for sample, (rows, p) in enumerate(zip(self.rows, self.probabilities)):
            x = logits[sample, rows]
            total -= float(np.einsum("ij,ij->", p, x.astype(np.float64)))
            peak = x.max(axis=-1, keepdims=True)
            shifted = np.exp(x - peak)  # float32 exponentials summed in float64: within 1e-8 nats a position of
            # float64 exponentials, in less than half their time
            total += float((peak[:, 0].astype(np.float64) + np.log(shifted.sum(axis=-1, dtype=np.float64))).sum())
        return max(total, 0.0)  # KL ≥ 0: what float32 rounding leaves of an unchanged variant (~1e-9) is none


@dataclass
class NextTokenScores:
    """Running sums of the next-token figures over batches; `result()` gives the record."""

    nll_dense: float = 0.0
    nll_compressed: float = 0.0
    kl: float = 0.0
    agreeing: int = 0
    positions: int = 0

    def add(self, dense: np.ndarray, compressed: np.ndarray, input_ids: np.ndarray, mask: np.ndarray | None) -> None:
        """One batch: logits of both models [batch, T, vocab], the token ids and attention mask fed [batch, T]."""
        for sample, rows in enumerate(scored_rows(input_ids, mask)):
            if rows.size == 0:
                continue
            targets = input_ids[sample, rows + 1]
            log_p = log_softmax(dense[sample, rows])
            log_q = log_softmax(compressed[sample, rows])
            picked = np.arange(rows.size)
            self.nll_dense -= float(log_p[picked, targets].sum())
            self.nll_compressed -= float(log_q[picked, targets].sum())
            self.kl += float((np.exp(log_p) * (log_p - log_q)).sum())
            self.agreeing += int((log_p.argmax(axis=1) == log_q.argmax(axis=1)).sum())
            self.positions += int(rows.size)

    def result(self) -> NextTokenAccuracy | None:
        """The figures, or None when no position had a next token (windows of one token)."""
        if self.positions == 0:
            return None
        dense = float(np.exp(self.nll_dense / self.positions))
        compressed = float(np.exp(self.nll_compressed / self.positions))
        return NextTokenAccuracy(positions=self.positions, ppl_dense=dense, ppl=compressed,
                                 ppl_ratio=compressed / dense, top1_agreement=self.agreeing / self.positions,
                                 kl=self.kl / self.positions)
