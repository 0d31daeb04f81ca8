"""What a build reads and what it writes, so that no output ever lands on an input."""

from __future__ import annotations

from pathlib import Path

from lrdeploy.onnx_io import LoadedModel, external_data_name
from lrdeploy.settings.build import BuildConfig
from lrdeploy.report.files import BENCH_FILES, REPORT_FILES


def output_files(output_model: Path) -> list[Path]:
    """Every file a build writes beside `output_model` (its external data, reports, bench results)."""
    folder = output_model.parent
    return [output_model, folder / external_data_name(output_model), *(folder / n for n in (*REPORT_FILES, *BENCH_FILES))]


def input_files(config: BuildConfig, model: LoadedModel) -> list[Path]:
    """Every file a build reads: the model, its external data, the sample files."""
    samples = [Path(config.calibration.calib)] if config.calibration.calib != "random" else []
    return [model.path, *model.external_files, *samples, *([Path(config.validation.eval)] if config.validation.eval else [])]
