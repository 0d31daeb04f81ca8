"""The calibration stage: moments of every linear layer's input tensor, cached on disk.

Moments are keyed by a hash of (model files, calibration samples, mask setting), so a second build of
the same model on the same data with another budget, method or allocation skips calibration. The
cache is an .npz (no pickle) written atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from lrdeploy.calib.data import InputSpec, SampleSet, iter_batches
from lrdeploy.calib.stats import TensorRequest, collect_moments, count_passes
from lrdeploy.files import atomic_path, atomic_write_text
from lrdeploy.lowrank.moments import Moments

CACHE_FORMAT = "moments-v1"


def _file_digest(digest: "hashlib._Hash", path: Path) -> None:
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)


def cache_key(model_files: list[Path], samples: SampleSet, settings: str | None) -> str:
    """Hex key over the model file and its external data files, the samples and the settings that change
    the result (the mask input for moments; also method and rank multiple for sensitivities)."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}|{settings}|".encode())
    for path in model_files:
        _file_digest(digest, path)
    digest.update(samples.content_digest())
    return digest.hexdigest()[:32]


def load_cached(path: Path, names: list[str]) -> dict[str, Moments] | None:
    """Moments for all `names` from the cache file, or None when it is absent or lacks one of them."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = [str(n) for n in data["names"]]
            index = {name: i for i, name in enumerate(stored)}
            if any(name not in index for name in names):
                return None
            return {
                name: Moments(float(data[f"count_{index[name]}"]), data[f"total_{index[name]}"], data[f"gram_{index[name]}"])
                for name in names
            }
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache entry is recomputed, never trusted


def store_cached(path: Path, moments: dict[str, Moments]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(moments)
    arrays: dict[str, np.ndarray] = {"names": np.array(names, dtype=np.str_)}
    for i, name in enumerate(names):
        arrays[f"count_{i}"] = np.array(moments[name].count)
        arrays[f"total_{i}"] = moments[name].total
        arrays[f"gram_{i}"] = moments[name].gram
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)


def load_sensitivity(path: Path) -> dict[str, dict[int, float]] | None:
    """A cached sensitivity table, or None when absent or unreadable."""
    try:
        data = json.loads(path.read_text())
        return {name: {int(rank): float(v) for rank, v in ranks.items()} for name, ranks in data.items()}
    except (OSError, ValueError, AttributeError):
        return None


def store_sensitivity(path: Path, table: dict[str, dict[int, float]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(table))
    except OSError:
        pass  # the cache is an optimisation; an unwritable cache folder must not fail the build


def calibrate(
    model: onnx.ModelProto,
    model_files: list[Path],
    requests: list[TensorRequest],
    samples: SampleSet,
    specs: list[InputSpec],
    batch_size: int,
    mask_name: str | None,
    cache_dir: Path | None,
    threads: int = 0,
    progress: Callable[[int], Callable[[], None]] | None = None,
) -> tuple[dict[str, Moments], bool]:
    """Moments of each requested tensor over `samples`; returns (moments, whether the cache served them).

    `progress(total_batches)` returns a callback invoked once per batch.
    """
    names = [r.name for r in requests]
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"{cache_key(model_files, samples, mask_name)}.npz"
        cached = load_cached(cache_path, names)
        if cached is not None:
            return cached, True
    batches = lambda: iter_batches(samples, specs, batch_size, mask_name)  # noqa: E731
    on_batch = None
    if progress is not None:
        on_batch = progress(count_passes(requests) * math.ceil(samples.count / batch_size))
    moments = collect_moments(model, requests, batches, mask_name, threads=threads, on_batch=on_batch)
    if cache_path is not None:
        try:
            store_cached(cache_path, moments)
        except OSError:
            pass  # the cache is an optimisation; an unwritable cache folder must not fail the build
    return moments, False
