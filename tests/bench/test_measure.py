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
    result = benchmark(runners, lambda b, s, p: {}, [(1, 128, None), (8, 128, None)], BenchSettings(warmup=1, iterations=4))
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


class BoundRunner(FakeRunner):
    """Binding costs 50 ticks (a host→device copy), a bound run 1 tick, a full infer 10."""

    def bind(self, feed):
        self.log.append(f"bind {self.name}")
        self.clock.now += 0.05

    def run_bound(self):
        self.log.append(self.name)
        self.clock.now += 0.001


def test_timed_region_is_the_bound_run_only():
    log, clock = [], Clock()
    runners = [BoundRunner("a", 0.01, log, clock), BoundRunner("b", 0.01, log, clock)]
    times = time_shape(runners, {}, BenchSettings(warmup=1, iterations=4), clock=clock)
    assert log == ["bind a", "bind b"] + ["a", "b"] * 5  # bound once, before warm-up and timing
    assert times == {"a": pytest.approx([1.0] * 4), "b": pytest.approx([1.0] * 4)}


def test_onnxruntime_io_binding_runs_the_same_model(tmp_path):
    from lrdeploy.runtime.onnxruntime import OrtRunner
    from tests import models

    onnx.save(models.matmul_add(), tmp_path / "m.onnx")
    feed = {"x": np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)}
    with OrtRunner(tmp_path / "m.onnx", threads=1) as runner:
        expected = runner.infer(feed)["y"]
        runner.bind(feed)
        runner.run_bound()
        (bound,) = runner._bound.copy_outputs_to_cpu()
    np.testing.assert_allclose(bound, expected, rtol=1e-6)


def test_ort_cuda_fp16_runs_a_converted_fp16_model_with_fp32_io(tmp_path):
    """What an `ort-cuda --precision fp16` session loads (made here without a GPU: the session is created later)."""
    from lrdeploy.bench.run import BenchConfig, make_runner
    from tests import models

    onnx.save(models.transformer(), tmp_path / "t.onnx")
    config = BenchConfig([str(tmp_path / "t.onnx")], "ort-cuda", precision="fp16")
    runner, specs = make_runner(str(tmp_path / "t.onnx"), config, "t.onnx", tmp_path / "work")
    converted = onnx.load(str(runner.model))
    assert runner.precision == "fp16" and runner.backend == "ort-cuda" and runner.model != tmp_path / "t.onnx"
    floats = [i for i in converted.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    weights = [i for i in floats if len(i.dims) == 2]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    assert [i.type.tensor_type.elem_type for i in converted.graph.input] == [onnx.TensorProto.INT64] * 2
    assert {o.type.tensor_type.elem_type for o in converted.graph.output} == {onnx.TensorProto.FLOAT}
    assert [s.name for s in specs] == ["input_ids", "attention_mask"]


@pytest.mark.parametrize("backend, precision, message", [
    ("ort-cpu", "fp16", r"--precision fp16 on ort-cpu: ONNX Runtime's CPU provider runs FP32 models"),
    ("ort-cuda", "bf16", r"--precision bf16 is not available on ONNX Runtime here: its converter writes fp16"),
    ("trt", None, None),
])
def test_precision_defaults_and_refusals(backend, precision, message):
    from lrdeploy.errors import OptionError
    from lrdeploy.bench.run import BenchConfig

    if message is None:
        assert BenchConfig(["m.onnx"], backend).precision == "fp16"
        assert BenchConfig(["m.onnx"], "ort-cpu").precision == "fp32"
        return
    with pytest.raises(OptionError, match=message):
        BenchConfig(["m.onnx"], backend, precision=precision)


def test_a_decoder_with_a_kv_cache_is_timed_in_prefill_and_decode(tmp_path):
    """bench on a with-past export: per batch a prefill of --seq tokens (empty past) and one decode step over
    --past cached tokens, fed as a generation loop feeds it (mask over past and new, positions after the past)."""
    pytest.importorskip("transformers")
    from lrdeploy.bench.run import BenchConfig, bench_shapes
    from lrdeploy.export.torch_onnx import export_hf
    from tests.factories import tiny_llama_dir

    export_hf(tiny_llama_dir(tmp_path / "hf"), tmp_path / "lm.onnx", task="text-generation-with-past")
    specs = model_input_specs(onnx.load(str(tmp_path / "lm.onnx")))
    assert bench_shapes(BenchConfig([str(tmp_path / "lm.onnx")], batches=(1, 4), seq=32, past=100), specs) == [
        (1, 32, 0), (1, 1, 100), (4, 32, 0), (4, 1, 100)]
    feed = timing_feed(specs, batch=2, seq=1, past=100)
    assert feed["past_key_values.1.value"].shape == (2, 2, 100, 16) and feed["attention_mask"].shape == (2, 101)
    assert feed["input_ids"].shape == (2, 1) and feed["position_ids"].tolist() == [[100], [100]]
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "lm.onnx"), "--batch", "1", "--seq", "8", "--past", "20",
                                       "--iterations", "2", "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "decode 1 × 1 over 20 past" in result.output
    shapes = json.loads((tmp_path / "b" / "bench.json").read_text())["shapes"]
    assert [(s["seq"], s["past"]) for s in shapes] == [(8, 0), (1, 20)]
