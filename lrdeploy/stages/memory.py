"""Will the statistics fit? An estimate made before calibration, so that a build that cannot fit stops at once with
one line instead of being killed by the kernel an hour in (an LM head's 49152² output covariance alone is 19 GB).

    calibration   one float64 second-moment matrix per distinct input tensor      Σ d_in² · 8 bytes
    decomposition a covariance and its eigenvectors per layer                       Σ d² · 16 bytes
                  (d = min(d_in, d_out): a layer wider out than in is solved on its input side,
                  `lowrank.decompose`)

Weights, activations and ONNX Runtime's sessions come on top; the estimate is the part that grows with the square
of the widths, which is what runs a machine out of memory."""

from __future__ import annotations

import os

from lrdeploy.calib.stats import TensorRequest
from lrdeploy.errors import MemoryLimitError
from lrdeploy.passes.linear_layers import LinearLayer

GIB = 1 << 30


def statistics_bytes(requests: list[TensorRequest], layers: list[LinearLayer]) -> tuple[int, str]:
    """(bytes, the largest item named) the calibration moments and the decompositions hold together."""
    items = {f"the input statistics of {r.name!r} ({r.dim}²)": 8 * r.dim * r.dim for r in requests}
    for layer in layers:
        side = min(layer.d_in, layer.d_out)
        items[f"the decomposition of {layer.name!r} ({side}²)"] = 16 * side * side
    largest = max(items, key=items.__getitem__, default="nothing")
    return sum(items.values()), largest


def available_bytes() -> int | None:
    """Memory the kernel says a new allocation can have (MemAvailable), or None where it does not say."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_statistics_fit(requests: list[TensorRequest], layers: list[LinearLayer]) -> None:
    """Stop with one line when the statistics alone would not fit in the memory available now."""
    needed, largest = statistics_bytes(requests, layers)
    available = available_bytes()
    if available is not None and needed > available:
        raise MemoryLimitError(
            f"the statistics of {len(layers)} layers need about {needed / GIB:.1f} GiB (the largest: {largest}), more "
            f"than the {available / GIB:.1f} GiB available now; free memory or build on a larger machine")
