"""Calibration and evaluation inputs: load them, check them against the model, batch them.

A sample set maps each model input name to an array whose first axis is the sample (= the model's
batch) axis. Sources: an .npz file (one array per input), a Polygraphy inputs JSON as written by
`polygraphy run --save-inputs` (a list of feed dicts, concatenated along the batch axis), or random
data from Polygraphy's DataLoader.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import onnx

from lrdeploy.errors import ModelLoadError, CalibrationDataError, OptionError
from lrdeploy.files import load_npz
from lrdeploy.shapes import parse_named_shapes

RANDOM_SOURCE = "random"
MASK_NAME_PATTERN = re.compile(r"(attention_?mask|input_?mask|^mask$)", re.IGNORECASE)


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype and shape (ints for static dims, str/None for dynamic ones)."""

    name: str
    dtype: np.dtype
    shape: tuple

    def is_dynamic(self, axis: int) -> bool:
        return axis < len(self.shape) and not isinstance(self.shape[axis], int)


def require_batch_axes(model: onnx.ModelProto) -> None:
    """Every run-time input and every output has a batch axis (axis 0): samples are fed, batched and compared
    along it, so a scalar (rank 0) input or output is one Error line, not an IndexError deep in validation."""
    initializers = {init.name for init in model.graph.initializer}
    for kind, values in (("input", [v for v in model.graph.input if v.name not in initializers]),
                         ("output", list(model.graph.output))):
        for value in values:
            tensor_type = value.type.tensor_type
            if tensor_type.HasField("shape") and len(tensor_type.shape.dim) == 0:
                raise ModelLoadError(f"model {kind} {value.name!r} is a scalar (rank 0); lrdeploy feeds and compares "
                                     f"samples along axis 0 (the batch axis): export the model with a batch axis on "
                                     f"every input and output")


def model_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that are fed at run time (initializers listed as inputs are excluded)."""
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
            for d in tensor_type.shape.dim
        )
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


def parse_shape_overrides(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse `--shape NAME:DIMS` options such as `input_ids:1x128` into {name: (1, 128)}."""
    parsed = parse_named_shapes(items, "NAME:DIMS", "input_ids:1x128")
    for item, shapes in zip(items, parsed.values()):
        if len(shapes) != 1:
            raise OptionError(f"--shape {item!r} gives {len(shapes)} shapes; give one, like input_ids:1x128")
    return {name: shapes[0] for name, shapes in parsed.items()}


@dataclass
class SampleSet:
    """Model inputs for `count` samples, each array indexed by sample along axis 0."""

    arrays: dict[str, np.ndarray]

    @property
    def count(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0]) if self.arrays else 0

    def select(self, indices: np.ndarray | slice) -> "SampleSet":
        return SampleSet({name: array[indices] for name, array in self.arrays.items()})

    def content_digest(self) -> bytes:
        """Bytes that identify this sample set (names, dtypes, shapes, values) for cache keys."""
        import hashlib

        digest = hashlib.sha256()
        for name in sorted(self.arrays):
            array = np.ascontiguousarray(self.arrays[name])
            digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
            digest.update(array.tobytes())
        return digest.digest()


def _load_polygraphy_json(path: Path) -> dict[str, np.ndarray]:
    from polygraphy.json import load_json

    try:
        feeds = load_json(str(path))
    except Exception as exc:
        raise CalibrationDataError(
            f"{path} is not a Polygraphy inputs JSON ({type(exc).__name__}); "
            "write one with `polygraphy run --save-inputs FILE` or use an .npz"
        ) from None
    if not isinstance(feeds, list) or not feeds or not all(isinstance(f, Mapping) for f in feeds):
        raise CalibrationDataError(
            f"{path} does not hold a list of feed dicts; write it with `polygraphy run --save-inputs FILE`"
        )
    names = list(feeds[0])
    try:
        return {name: np.concatenate([np.asarray(feed[name]) for feed in feeds], axis=0) for name in names}
    except (KeyError, ValueError) as exc:
        raise CalibrationDataError(
            f"{path}: feed dicts do not share names and shapes ({exc}); save inputs from one model run"
        ) from None


def load_sample_file(path: Path) -> SampleSet:
    """Load an .npz or Polygraphy JSON sample file (pickle never allowed)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationDataError(f"calibration file {path} does not exist; pass an .npz, a Polygraphy JSON, or 'random'")
    if path.suffix.lower() == ".json":
        return SampleSet(_load_polygraphy_json(path))
    return SampleSet(load_npz(path))


def concrete_shape(spec: InputSpec, overrides: Mapping[str, tuple[int, ...]], batch: int = 1) -> tuple[int, ...]:
    """A concrete per-batch shape for `spec`: --shape if given, else static dims with batch on axis 0."""
    if spec.name in overrides:
        return overrides[spec.name]
    dims = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int):
            dims.append(dim)
        elif axis == 0:
            dims.append(batch)
        else:
            example = "x".join(str(d) if isinstance(d, int) else ("1" if i == 0 else "128")
                               for i, d in enumerate(spec.shape))
            raise CalibrationDataError(
                f"input {spec.name!r} has dynamic axis {axis} ({dim}); give its size with --shape, "
                f"e.g. --shape {spec.name}:{example}"
            )
    return tuple(dims)


def random_samples(
    specs: Sequence[InputSpec], count: int, overrides: Mapping[str, tuple[int, ...]], seed: int = 1
) -> SampleSet:
    """`count` random samples from Polygraphy's DataLoader (poor factors: real data is much better)."""
    from polygraphy.common import TensorMetadata
    from polygraphy.comparator import DataLoader

    metadata = TensorMetadata()
    for spec in specs:
        metadata.add(spec.name, spec.dtype, concrete_shape(spec, overrides))
    # Integer inputs are usually token ids or masks: keep them small and valid (0 and 1 included).
    loader = DataLoader(seed=seed, iterations=count, input_metadata=metadata, val_range=(0, 1))
    feeds = [dict(feed) for feed in loader]
    return SampleSet({spec.name: np.concatenate([f[spec.name] for f in feeds], axis=0) for spec in specs})


PRESENT_OUTPUT = re.compile(r"^present[._]")  # Optimum's (and torch exports') cache outputs: present.N.key, ...


def is_past_input(spec: InputSpec) -> bool:
    """A KV-cache input of a decoder exported with its past (`past_key_values.N.key`, Optimum's naming; `past.*`):
    rank 4 [batch, heads, past length, head size], the past length dynamic."""
    return (spec.name.startswith(("past_key_values", "past.")) and len(spec.shape) == 4 and spec.is_dynamic(2)
            and all(isinstance(dim, int) for dim in (spec.shape[1], spec.shape[3])))


def with_prefill_inputs(samples: SampleSet, specs: Sequence[InputSpec]) -> SampleSet:
    """Text windows (input_ids, attention_mask) completed for a decoder exported with its KV cache, as a prefill:
    each past input empty ([n, heads, 0, head size]) and, when the model reads them and the file has none,
    position_ids counting the real tokens (0, 1, 2, … under the attention mask). Inputs the file has are kept."""
    arrays = dict(samples.arrays)
    names = {spec.name for spec in specs}
    past = [spec for spec in specs if is_past_input(spec) and spec.name not in arrays]
    if not past or "input_ids" not in arrays:
        return samples
    count = samples.count
    for spec in past:
        arrays[spec.name] = np.zeros((count, spec.shape[1], 0, spec.shape[3]), spec.dtype)
    if "position_ids" in names and "position_ids" not in arrays:
        ids = arrays["input_ids"]
        mask = arrays.get("attention_mask", np.ones_like(ids))
        arrays["position_ids"] = np.maximum(np.cumsum(mask != 0, axis=1) - 1, 0).astype(np.int64)
    return SampleSet(arrays)


def validate_samples(samples: SampleSet, specs: Sequence[InputSpec], label: str) -> SampleSet:
    """Check that `samples` has every model input with the model's dtype and compatible static dims;
    return the samples restricted to the model's inputs."""
    names = sorted(samples.arrays)
    for spec in specs:
        if spec.name not in samples.arrays:
            raise CalibrationDataError(
                f"{label} has no array for model input {spec.name!r} (it has: {', '.join(names) or 'none'}); "
                f"add one named {spec.name!r}"
            )
        array = samples.arrays[spec.name]
        if array.dtype != spec.dtype:
            raise CalibrationDataError(
                f"{label}: input {spec.name!r} is {array.dtype} but the model expects {spec.dtype}; "
                f"convert it with .astype(numpy.{spec.dtype})"
            )
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad = int(array.size - np.isfinite(array).sum())
            raise CalibrationDataError(
                f"{label}: input {spec.name!r} holds {bad} NaN or infinite values; replace or drop those samples"
            )
        static_ok = array.ndim == len(spec.shape) and all(
            not isinstance(dim, int) or axis == 0 and dim == 1 or array.shape[axis] == dim
            for axis, dim in enumerate(spec.shape)
        )
        if not static_ok:
            expected = "x".join(str(d) if isinstance(d, int) else "?" for d in spec.shape)
            raise CalibrationDataError(
                f"{label}: input {spec.name!r} has shape {'x'.join(map(str, array.shape))} but the model "
                f"expects {expected} (axis 0 = samples); reshape it to match"
            )
    counts = {samples.arrays[s.name].shape[0] for s in specs}
    if len(counts) != 1:
        raise CalibrationDataError(f"{label}: inputs have different sample counts {sorted(counts)}; give each input the same number of samples")
    if samples.count == 0:
        raise CalibrationDataError(f"{label} holds no samples; give at least one")
    return SampleSet({spec.name: samples.arrays[spec.name] for spec in specs})


def check_masks(samples: SampleSet, mask_name: str | None, label: str) -> None:
    """Every sample has at least one real position: a sample whose attention mask is all zeros has no content,
    and statistics or accuracy measured on such samples mean nothing."""
    if mask_name is None:
        return
    mask = samples.arrays[mask_name]
    empty = int((mask.reshape(mask.shape[0], -1) == 0).all(axis=1).sum())
    if empty:
        raise CalibrationDataError(
            f"{label}: {empty} of {samples.count} samples have an all-zero {mask_name!r} (no real token); "
            "drop them, or check how the mask was made"
        )


def check_index_ranges(samples: SampleSet, limits: Mapping[str, int], label: str) -> None:
    """Integer inputs that index a table (token ids into an embedding) stay inside it: 0 ≤ id < rows."""
    for name, rows in limits.items():
        values = samples.arrays.get(name)
        if values is not None and values.size and (values.min() < 0 or values.max() >= rows):
            raise CalibrationDataError(
                f"{label}: input {name!r} holds ids from {values.min()} to {values.max()} but the model's table "
                f"has {rows} rows (ids 0..{rows - 1}); tokenize with the model's own tokenizer"
            )


def detect_mask_input(specs: Sequence[InputSpec], override: str | None = None) -> str | None:
    """The attention-mask input (by name, e.g. `attention_mask`), or the user's override; None if absent, or when
    the override is "none" (statistics then count every position: for a mask that is not one row per token of the
    tensors measured, such as a decoder's mask over past and new tokens)."""
    if override == "none":
        return None
    if override is not None:
        if override not in {s.name for s in specs}:
            raise CalibrationDataError(
                f"--mask-input {override!r} is not a model input ({', '.join(s.name for s in specs)}); pass one of those"
            )
        return override
    candidates = [s for s in specs if MASK_NAME_PATTERN.search(s.name) and len(s.shape) == 2]
    return candidates[0].name if len(candidates) == 1 else None


@dataclass(frozen=True)
class Feeds:
    """How samples are fed to a model: its input specs, the batch size and the attention-mask input (if any)."""

    specs: list[InputSpec]
    batch_size: int
    mask_name: str | None = None

    def batches(self, samples: "SampleSet") -> Iterator[dict[str, np.ndarray]]:
        return iter_batches(samples, self.specs, self.batch_size, self.mask_name)


def iter_batches(
    samples: SampleSet,
    specs: Sequence[InputSpec],
    batch_size: int,
    mask_name: str | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield feed dicts of up to `batch_size` samples.

    With an attention mask and a dynamic sequence axis, samples are sorted by length and each batch
    is cut to its longest real sample, so padding costs neither time nor statistics. A model with a
    static batch axis gets batches of exactly that size.
    """
    static_batch = specs[0].shape[0] if specs and isinstance(specs[0].shape[0], int) else None
    if static_batch is not None:
        batch_size = static_batch
    order = np.arange(samples.count)
    lengths = None
    if mask_name is not None:
        mask = samples.arrays[mask_name]
        seq_inputs = [s for s in specs if s.is_dynamic(1) and samples.arrays[s.name].ndim >= 2
                      and samples.arrays[s.name].shape[1] == mask.shape[1]]
        if any(s.name == mask_name for s in seq_inputs):
            nonzero = mask != 0
            lengths = np.where(nonzero.any(1), mask.shape[1] - np.argmax(nonzero[:, ::-1], axis=1), 1)
            order = np.argsort(lengths, kind="stable")
            seq_names = {s.name for s in seq_inputs}
    for start in range(0, samples.count - (samples.count % batch_size if static_batch else 0), batch_size):
        index = order[start:start + batch_size]
        feed = {name: array[index] for name, array in samples.arrays.items()}
        if lengths is not None:
            cut = int(lengths[index].max())
            feed = {name: (a[:, :cut] if name in seq_names else a) for name, a in feed.items()}
        yield {name: np.ascontiguousarray(a) for name, a in feed.items()}
