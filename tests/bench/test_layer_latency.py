import pytest

import lrdeploy.planning.latency_aware as latency
from lrdeploy.bench.layer_latency import ShapeTiming, time_shapes
from lrdeploy.bench.timer import Timer
from lrdeploy.errors import BudgetError
from lrdeploy.lowrank.allocate import LayerShape, allocate_around_dense, realized_ratio


def test_time_shapes_measures_every_rank():
    timings = time_shapes({(64, 96): {16, 32}}, tokens=32, threads=1, iterations=3, warmup=1)
    timing = timings[(64, 96)]
    assert set(timing.split_ms) == {16, 32} and timing.dense_ms > 0 and timing.speedup(16) > 0


def test_latency_aware_plan_holds_slow_splits_dense_within_budget():
    shapes = [LayerShape(f"sq{i}", 384, 384) for i in range(4)] + [LayerShape(f"wide{i}", 384, 1536) for i in range(2)]

    def fake_time_shapes(needed, tokens, device, threads):
        # square splits lose at any rank; wide ones win
        return {key: ShapeTiming(*key, tokens, 1.0, {r: (2.0 if key == (384, 384) else 0.5) for r in ranks})
                for key, ranks in needed.items()}

    result = latency.latency_aware_plan("uniform", shapes, 0.8, 16, None, Timer(tokens=128, clock=fake_time_shapes))
    assert all(result.plan[f"sq{i}"] is None for i in range(4))
    assert all(result.plan[f"wide{i}"] is not None for i in range(2))
    assert result.slower == {f"sq{i}": 0.5 for i in range(4)}
    assert realized_ratio(shapes, result.plan) <= 0.8
    assert result.measured_speedup(shapes[4], result.plan["wide0"]) == 2.0


def test_holding_layers_dense_can_exhaust_the_budget():
    shapes = [LayerShape("a", 384, 384), LayerShape("b", 384, 384)]
    with pytest.raises(BudgetError, match=r"keeping 1 layers dense where splitting does not pay leaves too little"):
        allocate_around_dense("uniform", shapes, {"a"}, 0.5, 16)
