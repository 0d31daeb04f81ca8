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
from lrdeploy.files import atomic_write_npz, atomic_write_text
from lrdeploy.lowrank.moments import Moments

CACHE_FORMAT = "moments-v2"  # v2: entries carry a checksum of their content
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


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _read_moments(path: Path, names: list[str]) -> dict[str, Moments] | None:
    """Moments for all `names` from a cache file, or None when it is absent, lacks one of them, or is damaged
    in any way (unreadable, truncated, or content that does not match its checksum)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files if name != "checksum"}
            if str(data["checksum"]) != _checksum(arrays):
                return None
        index = {str(name): i for i, name in enumerate(arrays["names"])}
        if any(name not in index for name in names):
            return None
        return {name: Moments(float(arrays[f"count_{index[name]}"]), arrays[f"total_{index[name]}"],
                              arrays[f"gram_{index[name]}"]) for name in names}
    except Exception:  # noqa: BLE001 — whatever is wrong with an entry, it is recomputed, never trusted
        return None


def _write_moments(path: Path, moments: dict[str, Moments]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(moments)
    arrays: dict[str, np.ndarray] = {"names": np.array(names, dtype=np.str_)}
    for i, name in enumerate(names):
        arrays[f"count_{i}"] = np.array(moments[name].count)
        arrays[f"total_{i}"] = moments[name].total
        arrays[f"gram_{i}"] = moments[name].gram
    arrays["checksum"] = np.array(_checksum(arrays))
    atomic_write_npz(path, arrays)


def _table_text(table: SensitivityTable) -> str:
    return json.dumps({name: {str(rank): value for rank, value in ranks.items()} for name, ranks in table.items()},
                      sort_keys=True)


def _read_sensitivity(path: Path) -> SensitivityTable | None:
    """A cached sensitivity table, or None when absent, unreadable or not matching its checksum."""
    try:
        data = json.loads(path.read_text())
        table = {name: {int(rank): float(v) for rank, v in ranks.items()} for name, ranks in data["table"].items()}
        if data["sha256"] != hashlib.sha256(_table_text(table).encode()).hexdigest():
            return None
        return table
    except Exception:  # noqa: BLE001 — likewise
        return None


def _write_sensitivity(path: Path, table: SensitivityTable) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _table_text(table)
    atomic_write_text(path, json.dumps({"sha256": hashlib.sha256(text.encode()).hexdigest(),
                                        "table": json.loads(text)}))


class StatisticsCache:
    """Get-or-compute for one model's moments and sensitivity tables; with `directory` None it only computes."""

    def __init__(self, directory: Path | None, model_files: list[Path], graph_variant: str = ""):
        """`graph_variant` names a rewrite of the model applied before calibration (e.g. "ort" fusion)."""
        self.directory = None if directory is None else Path(directory)
        self.model_files, self.graph_variant = model_files, graph_variant

    def _path(self, samples: SampleSet, settings: str, suffix: str) -> Path | None:
        if self.directory is None:
            return None
        settings = f"{settings}|{self.graph_variant}" if self.graph_variant else settings
        return self.directory / f"{cache_key(self.model_files, samples, settings)}{suffix}"

    def moments(self, samples: SampleSet, mask_name: str | None, names: list[str],
                collect: Callable[[], dict[str, Moments]], per_group: bool = False) -> tuple[dict[str, Moments], bool]:
        """The moments of `names` over `samples` from the cache, or `collect()`ed and stored; and whether the
        cache served them. `per_group`: these names are one calibration group, stored in an entry of their own."""
        cached = self.cached_moments(samples, mask_name, names, per_group)
        if cached is not None:
            return cached, True
        moments = collect()
        self.store_moments(samples, mask_name, moments, per_group)
        return moments, False

    def _moments_path(self, samples: SampleSet, mask_name: str | None, names: list[str], per_group: bool
                      ) -> Path | None:
        settings = str(mask_name)
        if per_group:
            settings += "|group:" + hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
        return self._path(samples, settings, ".npz")

    def has_moments(self, samples: SampleSet, mask_name: str | None, names: list[str], per_group: bool = False
                    ) -> bool:
        """Whether an entry for `names` exists (read, and checked, by `cached_moments`)."""
        path = self._moments_path(samples, mask_name, names, per_group)
        return path is not None and path.is_file()

    def cached_moments(self, samples: SampleSet, mask_name: str | None, names: list[str], per_group: bool = False
                       ) -> dict[str, Moments] | None:
        """The cached moments of `names`, or None."""
        path = self._moments_path(samples, mask_name, names, per_group)
        return None if path is None else _read_moments(path, names)

    def store_moments(self, samples: SampleSet, mask_name: str | None, moments: dict[str, Moments],
                      per_group: bool = False) -> None:
        path = self._moments_path(samples, mask_name, list(moments), per_group)
        if path is not None:
            try:
                _write_moments(path, moments)
            except OSError:
                pass  # the cache is an optimisation; an unwritable cache folder must not fail the build

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
