"""Next-token figures of a causal LM (perplexity, top-1 agreement, KL) against direct computations."""

import numpy as np

from lrdeploy.stages.next_token import NextTokenReference, NextTokenScores, is_next_token_output


def _reference(dense, compressed, ids, mask):
    """Perplexities, agreement and KL by a plain loop over (sample, position)."""
    nll_p = nll_q = kl = agree = count = 0.0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if not (mask[b, t] and mask[b, t + 1]):
                continue
            p = np.exp(dense[b, t] - dense[b, t].max()); p /= p.sum()
            q = np.exp(compressed[b, t] - compressed[b, t].max()); q /= q.sum()
            nll_p -= np.log(p[ids[b, t + 1]]); nll_q -= np.log(q[ids[b, t + 1]])
            kl += float(np.sum(p * np.log(p / q)))
            agree += float(p.argmax() == q.argmax())
            count += 1
    return np.exp(nll_p / count), np.exp(nll_q / count), agree / count, kl / count, int(count)


def test_scores_match_a_direct_computation_and_skip_padding():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, (3, 9))
    mask = np.ones((3, 9), np.int64)
    mask[1, 5:] = 0  # right padding: positions 4.. of sample 1 have no real next token
    dense = rng.normal(size=(3, 9, 50)).astype(np.float32) * 3
    compressed = dense + rng.normal(size=dense.shape).astype(np.float32)
    scores = NextTokenScores()
    scores.add(dense[:2], compressed[:2], ids[:2], mask[:2])  # batches accumulate
    scores.add(dense[2:], compressed[2:], ids[2:], mask[2:])
    result = scores.result()
    ppl_p, ppl_q, agree, kl, count = _reference(dense, compressed, ids, mask)
    assert result.positions == count == 8 + 4 + 8
    np.testing.assert_allclose([result.ppl_dense, result.ppl, result.top1_agreement, result.kl],
                               [ppl_p, ppl_q, agree, kl], rtol=1e-6)
    np.testing.assert_allclose(result.ppl_ratio, ppl_q / ppl_p, rtol=1e-6)


def test_the_precomputed_dense_side_gives_the_same_kl():
    """Sensitivity scores many variants against one reference: KL from the dense distributions kept once equals
    the direct computation, padding skipped."""
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 300, (2, 12))
    mask = np.ones((2, 12), np.int64)
    mask[0, 7:] = 0
    dense = rng.normal(size=(2, 12, 300)).astype(np.float32) * 4
    reference = NextTokenReference(dense, ids, mask)
    for scale in (1.0, 1e-3):  # far, and so close that KL is tiny
        variant = dense + scale * rng.normal(size=dense.shape).astype(np.float32)
        direct = NextTokenScores()  # float64 throughout (the loop above works in the logits' float32)
        direct.add(dense, variant, ids, mask)
        assert reference.positions == direct.positions == 6 + 11
        np.testing.assert_allclose(reference.kl_sum(variant) / reference.positions, direct.kl / direct.positions,
                                   rtol=1e-6, atol=1e-8)  # float32 exponentials: 1e-8 nats a position
    assert abs(reference.kl_sum(dense)) < 1e-8 * reference.positions


def test_identical_and_uniform_logits():
    ids = np.array([[1, 2, 3, 4]])
    same = np.random.default_rng(1).normal(size=(1, 4, 10))
    scores = NextTokenScores()
    scores.add(same, same, ids, None)
    result = scores.result()
    assert result.ppl_ratio == 1.0 and result.top1_agreement == 1.0 and abs(result.kl) < 1e-12
    uniform = NextTokenScores()
    uniform.add(np.zeros((1, 4, 10)), np.zeros((1, 4, 10)), ids, None)
    np.testing.assert_allclose(uniform.result().ppl_dense, 10.0)  # uniform over 10 words
    assert NextTokenScores().result() is None  # nothing scored


def test_what_counts_as_next_token_logits():
    ids = np.array([[1, 7, 3]])
    assert is_next_token_output("logits", np.zeros((1, 3, 8)), {"input_ids": ids})
    assert not is_next_token_output("logits", np.zeros((1, 3, 5)), {"input_ids": ids})  # 5 labels: 7 is no index
    assert not is_next_token_output("logits", np.zeros((1, 8)), {"input_ids": ids})  # pooled
    assert not is_next_token_output("logits", np.zeros((1, 3, 8)), {"tokens": ids})  # no input_ids fed
    assert not is_next_token_output("last_hidden_state", np.zeros((1, 3, 8)), {"input_ids": ids})  # states
