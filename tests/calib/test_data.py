import numpy as np
import pytest

from lrdeploy.calib.data import (
    SampleSet,
    detect_mask_input,
    iter_batches,
    load_sample_file,
    model_input_specs,
    parse_shape_overrides,
    random_samples,
    validate_samples,
)
from lrdeploy.errors import CalibrationDataError, OptionError
from tests import models

SPECS = model_input_specs(models.transformer())


def test_specs_read_dtype_and_dynamic_axes():
    assert [(s.name, s.dtype, s.shape) for s in SPECS] == [
        ("input_ids", np.dtype(np.int64), ("batch", "seq")),
        ("attention_mask", np.dtype(np.int64), ("batch", "seq")),
    ]
    assert detect_mask_input(SPECS) == "attention_mask"


def test_polygraphy_inputs_json_is_concatenated_along_batch(tmp_path):
    from polygraphy.json import save_json

    feeds = [{"x": np.full((2, 64), i, np.float32)} for i in range(3)]
    save_json(feeds, str(tmp_path / "inputs.json"))
    samples = load_sample_file(tmp_path / "inputs.json")
    assert samples.arrays["x"].shape == (6, 64)
    np.testing.assert_array_equal(samples.arrays["x"][:, 0], [0, 0, 1, 1, 2, 2])


def test_pickled_npz_is_refused(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, input_ids=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CalibrationDataError, match=r"holds pickled \(object\) arrays, which lrdeploy never loads"):
        load_sample_file(path)


@pytest.mark.parametrize("arrays, message", [
    ({"input_ids": np.zeros((4, 8), np.int64)},
     r"has no array for model input 'attention_mask' \(it has: input_ids\); add one named 'attention_mask'"),
    ({"input_ids": np.zeros((4, 8), np.int32), "attention_mask": np.ones((4, 8), np.int64)},
     r"input 'input_ids' is int32 but the model expects int64; convert it with .astype\(numpy.int64\)"),
    ({"input_ids": np.zeros((4, 8, 2), np.int64), "attention_mask": np.ones((4, 8), np.int64)},
     r"input 'input_ids' has shape 4x8x2 but the model expects \?x\? \(axis 0 = samples\); reshape it to match"),
    ({"input_ids": np.zeros((4, 8), np.int64), "attention_mask": np.ones((5, 8), np.int64)},
     r"inputs have different sample counts \[4, 5\]"),
])
def test_mismatched_samples_are_refused(arrays, message):
    with pytest.raises(CalibrationDataError, match=message):
        validate_samples(SampleSet(arrays), SPECS, "calibration file c.npz")


def test_extra_arrays_are_dropped():
    arrays = {"input_ids": np.zeros((4, 8), np.int64), "attention_mask": np.ones((4, 8), np.int64),
              "labels": np.zeros(4)}
    assert set(validate_samples(SampleSet(arrays), SPECS, "c").arrays) == {"input_ids", "attention_mask"}


def test_random_samples_need_shapes_for_dynamic_axes():
    with pytest.raises(CalibrationDataError, match=r"give its size with --shape, e.g. --shape input_ids:1x128"):
        random_samples(SPECS, 4, {})
    samples = random_samples(SPECS, 4, parse_shape_overrides(["input_ids:1x8", "attention_mask:1x8"]))
    assert samples.arrays["input_ids"].shape == (4, 8) and samples.arrays["input_ids"].dtype == np.int64


@pytest.mark.parametrize("bad", ["input_ids", "input_ids:", "input_ids:1xa", ":1x8", "x:0x8"])
def test_bad_shape_option(bad):
    with pytest.raises(OptionError, match=f"--shape '{bad}' is not NAME:DIMS; write it like input_ids:1x128"):
        parse_shape_overrides([bad])


def test_batches_without_mask_keep_order_and_full_length():
    arrays = models.transformer_inputs(10, seq=6)
    batches = list(iter_batches(SampleSet(arrays), SPECS, 4))
    assert [b["input_ids"].shape for b in batches] == [(4, 6), (4, 6), (2, 6)]
    np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in batches]), arrays["input_ids"])


def test_mask_input_none_counts_every_position():
    from lrdeploy.calib.data import InputSpec, detect_mask_input

    specs = [InputSpec("input_ids", np.dtype(np.int64), ("batch", "seq")),
             InputSpec("attention_mask", np.dtype(np.int64), ("batch", "seq"))]
    assert detect_mask_input(specs) == "attention_mask"
    assert detect_mask_input(specs, "none") is None  # a decoder's mask over past and new tokens, say
