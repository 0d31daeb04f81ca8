"""The on-disk cache of expensive build results: calibration moments and sensitivity tables.

Entries are keyed by a hash of (model file and its external data, the samples used, the settings that change
the result), so a second build of the same model on the same data with another budget skips the work, and a
sweep over budgets does it once. Moments are an .npz (no pickle), sensitivity tables JSON; both are written
atomically. The cache is an optimisation: an unreadable entry is recomputed, and an unwritable cache folder
never fails a build.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np

from lrdeploy.calib.data import SampleSet
from lrdeploy.files import atomic_path, atomic_write_text
from lrdeploy.lowrank.moments import Moments

CACHE_FORMAT = "moments-v1"
SensitivityTable = dict[str, dict[int, float]]


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


def _read_moments(path: Path, names: list[str]) -> dict[str, Moments] | None:
    """Moments for all `names` from a cache file, or None when it is absent or lacks one of them."""
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


def _write_moments(path: Path, moments: dict[str, Moments]) -> None:
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


def _read_sensitivity(path: Path) -> SensitivityTable | None:
    """A cached sensitivity table, or None when absent or unreadable."""
    try:
        data = json.loads(path.read_text())
        return {name: {int(rank): float(v) for rank, v in ranks.items()} for name, ranks in data.items()}
    except (OSError, ValueError, AttributeError):
        return None


def _write_sensitivity(path: Path, table: SensitivityTable) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(table))


class StatisticsCache:
    """Get-or-compute for one model's moments and sensitivity tables; with `directory` None it only computes."""

    def __init__(self, directory: Path | None, model_files: list[Path]):
        self.directory = None if directory is None else Path(directory)
        self.model_files = model_files

    def _path(self, samples: SampleSet, settings: str, suffix: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"{cache_key(self.model_files, samples, settings)}{suffix}"

    def moments(self, samples: SampleSet, mask_name: str | None, names: list[str],
                collect: Callable[[], dict[str, Moments]]) -> tuple[dict[str, Moments], bool]:
        """The moments of `names` over `samples` from the cache, or `collect()`ed and stored; and whether the
        cache served them."""
        path = self._path(samples, str(mask_name), ".npz")
        cached = None if path is None else _read_moments(path, names)
        if cached is not None:
            return cached, True
        moments = collect()
        if path is not None:
            try:
                _write_moments(path, moments)
            except OSError:
                pass  # the cache is an optimisation; an unwritable cache folder must not fail the build
        return moments, False

    def sensitivity(self, samples: SampleSet, settings: str, names: set[str],
                    measure: Callable[[], SensitivityTable]) -> SensitivityTable:
        """The sensitivity table of the layers `names` from the cache, or `measure()`d and stored."""
        path = self._path(samples, f"{settings}|sensitivity-v1", ".sensitivity.json")
        cached = None if path is None else _read_sensitivity(path)
        if cached is not None and set(cached) == names:
            return cached
        table = measure()
        if path is not None:
            try:
                _write_sensitivity(path, table)
            except OSError:
                pass  # likewise
        return table
