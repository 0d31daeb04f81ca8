"""Choose the calibration and held-out evaluation samples of a build.

Evaluation never reuses calibration samples: with --eval FILE it uses that file; otherwise it uses a
held-out tail of the calibration source (the samples after --calib-samples, or the last fifth).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import onnx

from lrdeploy.calib.data import (
    RANDOM_SOURCE,
    InputSpec,
    SampleSet,
    check_index_ranges,
    check_masks,
    load_sample_file,
    random_samples,
    validate_samples,
    with_prefill_inputs,
)
from lrdeploy.errors import CalibrationDataError, OptionError
from lrdeploy.settings.build import BuildConfig

DEFAULT_RANDOM_SAMPLES = 64
SAME_FILE_WARNING = (
    "--eval names the same file as --calib, so the accuracy is measured on calibration samples and overstates the "
    "held-out accuracy; leave --eval out (the tail of --calib is held out) or pass other samples"
)
RANDOM_WARNING = (
    "calibrating on random data: the factors will be poor; pass real inputs with --calib FILE (.npz or Polygraphy JSON)"
)


PROBE_SAMPLES = 16  # samples each measured option runs on (sensitivity, structured options, dropped blocks)
LM_PROBE_TOKENS = 128  # a causal LM's probe: each position is a next-token prediction, so one window measures as
# well as 16 (SmolLM2's unified plan at ρ 0.8: perplexity ×1.078 planned on one window of 128 tokens, ×1.072 on
# four) at a fraction of the time


@dataclass
class BuildSamples:
    calib: SampleSet
    eval: SampleSet
    calib_source: str
    eval_source: str
    warnings: list[str]

    def probe(self, requested: int | None, model: onnx.ModelProto) -> SampleSet:
        """The calibration samples each measured option runs on: `requested` (--sensitivity-samples), else
        PROBE_SAMPLES, or for a causal LM the windows that hold LM_PROBE_TOKENS tokens if fewer."""
        count = requested or PROBE_SAMPLES
        ids = self.calib.arrays.get("input_ids")
        if requested is None and ids is not None and ids.ndim == 2 and is_causal_lm(model):
            count = min(count, max(1, math.ceil(LM_PROBE_TOKENS / ids.shape[1])))
        return self.calib.select(slice(0, count))


def is_causal_lm(model: onnx.ModelProto) -> bool:
    """An output named as exporters name an LM's logits, [batch, T, vocabulary], over an input_ids [batch, T]."""
    inputs = {value.name: value for value in model.graph.input}
    if "input_ids" not in inputs or len(inputs["input_ids"].type.tensor_type.shape.dim) != 2:
        return False
    return any("logit" in output.name.lower() and len(output.type.tensor_type.shape.dim) == 3
               for output in model.graph.output)


def _holdout_split(samples: SampleSet, calib_samples: int | None, label: str) -> tuple[SampleSet, SampleSet]:
    count = samples.count
    if calib_samples is None:
        if count < 2:
            raise CalibrationDataError(
                f"{label} has {count} sample; give at least 2 so some can be held out, or pass --eval FILE"
            )
        calib_samples = count - max(1, count // 5)
    if calib_samples >= count:
        raise CalibrationDataError(
            f"{label} has {count} samples and --calib-samples {calib_samples} leaves none held out for "
            "evaluation; lower --calib-samples or pass --eval FILE"
        )
    return samples.select(slice(0, calib_samples)), samples.select(slice(calib_samples, None))


def _check_shape_overrides(config: BuildConfig, specs: list[InputSpec]) -> None:
    unknown = sorted(set(config.calibration.shapes) - {spec.name for spec in specs})
    if unknown:
        raise OptionError(f"--shape names {', '.join(map(repr, unknown))}, which is not a model input "
                          f"({', '.join(spec.name for spec in specs)}); name one of those")


def prepare_samples(config: BuildConfig, specs: list[InputSpec], mask_name: str | None = None,
                    index_limits: Mapping[str, int] | None = None) -> BuildSamples:
    """Load, check and split calibration and evaluation samples (fails before any expensive work): the model's
    inputs with its dtypes and shapes, finite values, no sample without a real position (`mask_name`), and ids
    inside the tables they index (`index_limits`)."""
    _check_shape_overrides(config, specs)
    calib, calib_samples, eval_path, eval_samples = config.calibration.calib, config.calibration.calib_samples, config.validation.eval, config.validation.eval_samples
    warnings = []
    if calib == RANDOM_SOURCE:
        warnings.append(RANDOM_WARNING)
        wanted = calib_samples or DEFAULT_RANDOM_SAMPLES
        held = 0 if eval_path else max(4, wanted // 4)
        source = random_samples(specs, wanted + held, config.calibration.shapes, config.calibration.seed)
        label = "random data"
    else:
        label = f"calibration file {calib}"
        source = validate_samples(with_prefill_inputs(load_sample_file(Path(calib)), specs), specs, label)
        check_masks(source, mask_name, label)
    if eval_path is not None:
        eval_label = f"evaluation file {eval_path}"
        eval_set = validate_samples(with_prefill_inputs(load_sample_file(eval_path), specs), specs, eval_label)
        check_masks(eval_set, mask_name, eval_label)
        if calib != RANDOM_SOURCE and Path(eval_path).resolve() == Path(calib).resolve():
            warnings.append(SAME_FILE_WARNING)
        calib_set = source.select(slice(0, calib_samples)) if calib_samples else source
        eval_source = str(eval_path)
    else:
        calib_set, eval_set = _holdout_split(source, calib_samples, label)
        eval_source = f"held-out tail of {label} ({eval_set.count} samples)"
    if eval_samples is not None:
        eval_set = eval_set.select(slice(0, eval_samples))
    check_index_ranges(calib_set, index_limits or {}, label)
    check_index_ranges(eval_set, index_limits or {}, f"evaluation data ({eval_source})")
    return BuildSamples(calib_set, eval_set, label, eval_source, warnings)
