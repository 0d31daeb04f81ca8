import numpy as np
import pytest

from lrdeploy.errors import InternalError
from lrdeploy.lowrank.decompose import decompose
from lrdeploy.lowrank.moments import Moments


def _moments(x: np.ndarray) -> Moments:
    return Moments.zeros(x.shape[1]).add(x.shape[0], x.sum(0), x.T @ x)


def _data(n=400, d_in=24, seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((d_in, d_in))
    return rng.standard_normal((n, d_in)) @ mixing + rng.standard_normal(d_in)


def test_moments_through_linear_match_direct_computation():
    x = _data()
    w = np.random.default_rng(1).standard_normal((24, 10))
    b = np.random.default_rng(2).standard_normal(10)
    via_input = _moments(x).through_linear(w, b)
    direct = _moments(x @ w + b)
    np.testing.assert_allclose(via_input.total, direct.total, rtol=1e-10)
    np.testing.assert_allclose(via_input.gram, direct.gram, rtol=1e-9)
    np.testing.assert_allclose(via_input.covariance, np.cov((x @ w + b).T, bias=True), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("method", ["pca", "svd", "whiten"])
def test_full_rank_reproduces_layer(method):
    x = _data()
    rng = np.random.default_rng(3)
    w, b = rng.standard_normal((24, 16)), rng.standard_normal(16)
    factors = decompose(method, w, b, _moments(x)).factors(16)
    y = x @ w + b
    y_hat = x @ factors.first @ factors.second + factors.bias
    assert np.linalg.norm(y_hat - y) / np.linalg.norm(y) < 1e-8


def test_pca_is_exact_at_the_true_output_rank():
    x = _data(d_in=32)
    rng = np.random.default_rng(4)
    w = rng.standard_normal((32, 5)) @ rng.standard_normal((5, 20))  # outputs span 5 directions
    b = rng.standard_normal(20)
    decomposition = decompose("pca", w, b, _moments(x))
    factors = decomposition.factors(5)
    y = x @ w + b
    assert np.linalg.norm(x @ factors.first @ factors.second + factors.bias - y) / np.linalg.norm(y) < 1e-8
    assert decomposition.energies[5:].sum() < 1e-8 * decomposition.energies.sum()
    assert factors.first.shape == (32, 5) and factors.second.shape == (5, 20)


def test_pca_beats_weight_svd_on_correlated_inputs():
    """Features low-rank, weights not: the calibrated projection loses less output energy at equal rank."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((500, 4)) @ rng.standard_normal((4, 32)) + 0.01 * rng.standard_normal((500, 32))
    w = rng.standard_normal((32, 32))
    y = x @ w

    def error(method):
        f = decompose(method, w, None, _moments(x)).factors(4)
        y_hat = x @ f.first @ f.second + (0 if f.bias is None else f.bias)
        return np.linalg.norm(y_hat - y) / np.linalg.norm(y)

    assert error("pca") < 0.05 < error("svd")


def test_svd_needs_no_statistics_but_pca_does():
    w = np.eye(8)
    assert decompose("svd", w, None).factors(8).rank == 8
    with pytest.raises(InternalError, match="needs calibration statistics"):
        decompose("pca", w, None)


def test_rank_out_of_range_is_a_bug():
    with pytest.raises(InternalError, match="rank 9 outside"):
        decompose("svd", np.eye(8), None).factors(9)


def test_a_wide_layer_is_decomposed_from_its_input_side():
    """A layer wider out than in (an FFN's up projection, an LM head) gets feature PCA from d_in × d_in matrices:
    the same factors as the d_out × d_out eigenproblem, without forming it (19 GB of float64 for a 49152-word
    head)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3000, 24)) @ rng.standard_normal((24, 24)) + rng.standard_normal(24)
    weight, bias = rng.standard_normal((24, 300)), rng.standard_normal(300)
    moments = Moments(3000.0, x.sum(0), x.T @ x)
    output = moments.through_linear(weight, bias)  # the d_out × d_out eigenproblem, solved here as the reference
    values, vectors = np.linalg.eigh(output.covariance)
    values, vectors = values[::-1], vectors[:, ::-1]
    input_side = decompose("pca", weight, bias, moments)
    assert input_side.basis.shape == (300, 24)  # no rank can use more
    assert input_side.energies.shape == (300,)  # the whole spectrum, zeros past d_in, for what a truncation discards
    np.testing.assert_allclose(input_side.energies, np.clip(values, 0, None), rtol=1e-8, atol=1e-8 * values[0])
    for rank in (4, 12, 23):
        projector = vectors[:, :rank] @ vectors[:, :rank].T
        factors = input_side.factors(rank)
        np.testing.assert_allclose(factors.dense_weight(), weight @ projector, atol=1e-8)
        np.testing.assert_allclose(factors.bias, output.mean - (output.mean - bias) @ projector, atol=1e-8)


def test_the_output_spectrum_comes_from_the_input_side():
    from lrdeploy.lowrank.decompose import output_spectrum

    rng = np.random.default_rng(5)
    x = rng.standard_normal((2000, 16)) @ rng.standard_normal((16, 16))
    weight = rng.standard_normal((16, 40))
    moments = Moments(2000.0, x.sum(0), x.T @ x)
    direct = np.sort(np.linalg.eigvalsh(moments.through_linear(weight, None).covariance))[::-1]
    np.testing.assert_allclose(output_spectrum(moments, weight), np.clip(direct, 0, None), atol=1e-8 * direct[0])


def test_a_rank_ceiling_keeps_only_the_vectors_a_plan_can_use():
    """Capped at `max_rank`, feature PCA holds W·U and U for that many ranks (in the weight's float32) and gives
    the same factors at every rank up to it as the uncapped decomposition; past it, it refuses."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4000, 48)) @ rng.standard_normal((48, 48))
    weight, bias = rng.standard_normal((48, 64)).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    moments = Moments(4000.0, x.sum(0), x.T @ x)
    full, capped = decompose("pca", weight, bias, moments), decompose("pca", weight, bias, moments, max_rank=16)
    assert capped.basis.shape == (64, 16) and capped.projected_weight.shape == (48, 16)
    assert capped.basis.dtype == capped.projected_weight.dtype == np.float32
    np.testing.assert_array_equal(capped.energies, full.energies)
    for rank in (1, 8, 16):
        a, b = capped.factors(rank), full.factors(rank)
        np.testing.assert_array_equal(a.first, b.first)
        np.testing.assert_array_equal(a.second, b.second)
        np.testing.assert_allclose(a.bias, b.bias, rtol=1e-6, atol=1e-6)
    with pytest.raises(InternalError, match="rank 17 outside"):
        capped.factors(17)


def test_rank_ceilings_follow_the_budget_of_a_uniform_plan():
    from lrdeploy.lowrank.allocate import LayerShape, rank_ceilings, uniform_ranks

    shapes = [LayerShape("square", 4096, 4096), LayerShape("up", 576, 1536), LayerShape("tiny", 8, 8)]
    saving = rank_ceilings(shapes, 16)
    assert saving == {"square": 2032, "up": 416, "tiny": 8}  # the last rank whose split saves parameters
    uniform = rank_ceilings(shapes, 16, (0.5, 0.3))
    plan = uniform_ranks(shapes, 0.5, 16)
    assert uniform["square"] == plan["square"] == 1024 and uniform["up"] == plan["up"]
    assert uniform["tiny"] == 8  # too small to split: its whole width, never more


@pytest.mark.parametrize("shape", [(48, 48), (32, 96), (96, 40)])
def test_float32_solve_keeps_the_top_of_the_spectrum(monkeypatch, shape):
    """Wide layers are solved in float32 (FLOAT32_WIDTH); forced onto small ones here, the kept subspace, the
    discarded energy allocation reads and the layer's output at a cut rank match the float64 solve."""
    from lrdeploy.lowrank import decompose as module

    d_in, d_out = shape
    rng = np.random.default_rng(6)
    x = rng.standard_normal((600, d_in)) * np.exp(-np.arange(d_in) / 6) + 3.0  # decaying spectrum, offset mean
    w, b = rng.standard_normal((d_in, d_out)).astype(np.float32), rng.standard_normal(d_out)
    moments = _moments(x)
    exact = decompose("pca", w, b, moments, max_rank=20)
    monkeypatch.setattr(module, "FLOAT32_WIDTH", 1)
    fast = decompose("pca", w, b, moments, max_rank=20)
    assert not np.array_equal(fast.energies, exact.energies)  # solved apart
    total = exact.energies.sum()
    np.testing.assert_allclose(fast.energies[:20], exact.energies[:20], rtol=1e-4, atol=1e-6 * total)
    y = x @ w + b
    for rank in (4, 12):
        errors = [np.linalg.norm(x @ f.first.astype(np.float64) @ f.second.astype(np.float64) + f.bias - y)
                  / np.linalg.norm(y - y.mean(0)) for f in (exact.factors(rank), fast.factors(rank))]
        assert abs(errors[1] - errors[0]) < 1e-4 * max(errors[0], 1e-3), errors


def test_a_partial_float32_solve_keeps_the_leading_pairs_and_every_discarded_sum(monkeypatch):
    """Without whole_spectrum, a float32 feature PCA solves for its max_rank leading pairs only: the same factors
    and leading energies as the whole solve, the rest of the trace spread evenly so that the discarded energy at
    every rank up to max_rank is exact."""
    from lrdeploy.lowrank import decompose as module
    from lrdeploy.lowrank.allocate import discarded_fraction

    monkeypatch.setattr(module, "FLOAT32_WIDTH", 1)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((500, 40)) * np.exp(-np.arange(40) / 8)
    w, b = rng.standard_normal((40, 40)).astype(np.float32), rng.standard_normal(40)
    whole = decompose("pca", w, b, _moments(x), max_rank=12)
    partial = decompose("pca", w, b, _moments(x), max_rank=12, whole_spectrum=False)
    np.testing.assert_allclose(partial.energies[:12], whole.energies[:12], rtol=1e-4)
    np.testing.assert_allclose(partial.energies[12:], partial.energies[12:].mean())  # spread, not solved
    assert partial.energies.shape == whole.energies.shape
    for rank in (1, 6, 12):
        assert discarded_fraction(partial.energies, rank) == pytest.approx(discarded_fraction(whole.energies, rank),
                                                                           rel=1e-4, abs=1e-6)
        np.testing.assert_allclose(np.abs(partial.factors(rank).second), np.abs(whole.factors(rank).second),
                                   atol=1e-4)  # eigenvectors up to sign
