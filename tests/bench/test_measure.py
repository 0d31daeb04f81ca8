import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from lrdeploy.bench.feeds import timing_feed
from lrdeploy.bench.measure import BenchSettings, LatencyStats, benchmark, result_from_dict, time_shape
from lrdeploy.calib.data import model_input_specs
from lrdeploy.cli import main
from lrdeploy.runtime.base import Runner
from tests import models


class FakeRunner(Runner):
    """Records the order it is called in; its 'latency' is a fixed number of fake-clock ticks."""

    def __init__(self, name, ticks, log, clock):
        super().__init__(name)
        self.ticks, self.log, self.clock = ticks, log, clock
        self.backend = "fake"

    def activate(self):
        self.active = True

    def infer(self, feed):
        self.log.append(self.name)
        self.clock.now += self.ticks
        return {}


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def test_latency_stats_percentiles_and_throughput():
    stats = LatencyStats.from_times([10.0] * 98 + [20.0, 30.0], batch=8, seq=128)
    assert stats.p50_ms == 10.0 and stats.max_ms == 30.0 and stats.runs == 100
    assert stats.mean_ms == pytest.approx(10.3)
    assert stats.inferences_per_s == pytest.approx(8 / 0.0103)
    assert stats.tokens_per_s == pytest.approx(8 * 128 / 0.0103)


def test_runs_alternate_after_warmup():
    log, clock = [], Clock()
    runners = [FakeRunner("a", 0.002, log, clock), FakeRunner("b", 0.001, log, clock)]
    times = time_shape(runners, {}, BenchSettings(warmup=2, iterations=3), clock=clock)
    assert log == ["a", "b"] * 5
    assert times == {"a": pytest.approx([2.0] * 3), "b": pytest.approx([1.0] * 3)}


def test_benchmark_reports_ratio_of_second_to_first(monkeypatch):
    import lrdeploy.bench.measure as measure

    clock = Clock()
    monkeypatch.setattr(measure.time, "perf_counter", clock)
    log = []
    runners = [FakeRunner("dense", 0.004, log, clock), FakeRunner("lowrank", 0.003, log, clock)]
    result = benchmark(runners, lambda b, s: {}, [1, 8], 128, BenchSettings(warmup=1, iterations=4))
    assert [s.batch for s in result.shapes] == [1, 8]
    assert result.shapes[0].ratio_p50 == pytest.approx(0.75)
    assert result_from_dict(json.loads(json.dumps(__import__("dataclasses").asdict(result)))) == result
    assert not any(r.active for r in runners)


def test_duration_bounds_the_timed_loop(monkeypatch):
    import lrdeploy.bench.measure as measure

    clock = Clock()
    monkeypatch.setattr(measure.time, "perf_counter", clock)
    runner = FakeRunner("a", 0.1, [], clock)
    times = time_shape([runner], {}, BenchSettings(warmup=0, iterations=None, duration_s=0.95), clock=clock)
    assert len(times["a"]) == 10


def test_timing_feed_shapes_and_values():
    feed = timing_feed(model_input_specs(models.transformer()), batch=4, seq=32)
    assert feed["input_ids"].shape == (4, 32) and feed["input_ids"].dtype == np.int64
    assert feed["attention_mask"].min() == 1
    assert 1 <= feed["input_ids"].min() and feed["input_ids"].max() < 64


def test_bench_cli_writes_json_markdown_and_plot(tmp_path):
    onnx.save(models.transformer(), tmp_path / "a.onnx")
    onnx.save(models.transformer(seed=1), tmp_path / "b.onnx")
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--batch", "1,2",
                                       "--seq", "8", "--iterations", "3", "--warmup", "1", "-o", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r" / "bench.json").read_text())
    assert data["models"] == ["a.onnx", "b.onnx"] and data["backend"] == "ort-cpu"
    assert [s["batch"] for s in data["shapes"]] == [1, 2] and data["shapes"][0]["latency"]["a.onnx"]["runs"] == 3
    assert data["shapes"][1]["ratio_p50"] > 0 and data["command"].startswith("lrdeploy bench")
    assert "| batch × seq | p50 ratio | mean ratio |" in (tmp_path / "r" / "bench.md").read_text()
    assert (tmp_path / "r" / "bench_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cli_errors(tmp_path):
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "missing.onnx")])
    assert result.exit_code == 1 and "Error: model file" in result.stderr and "does not exist" in result.stderr
    result = CliRunner().invoke(main, ["bench", "a.onnx", "b.onnx", "c.onnx"])
    assert result.exit_code == 1 and "bench takes one model, or two to compare" in result.stderr
