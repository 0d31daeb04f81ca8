"""Synthetic inputs for timing: token ids, full attention masks, random floats, at a chosen batch × sequence."""

from __future__ import annotations

import os

import numpy as np

from lrdeploy.calib.data import MASK_NAME_PATTERN, InputSpec, is_past_input
from lrdeploy.errors import OptionError

MEMORY_SHARE_FOR_INPUTS = 8  # timing inputs may take at most this fraction of memory: activations need the rest
TOKEN_ID_RANGE = (1, 64)  # small ids are valid in any vocabulary; timing does not depend on their values


def timing_feed(specs: list[InputSpec], batch: int, seq: int, seed: int = 0, past: int | None = None) -> dict[str, np.ndarray]:
    """A feed with axis 0 = batch, other dynamic axes = seq, static axes as the model says.

    Masks are all ones (no padding, the worst case); other integer inputs get small token ids. A decoder with a KV
    cache gets `past` cached positions (random keys and values [batch, heads, past, head size]), a mask over past
    and new tokens, and position ids past, past + 1, …
    """
    rng = np.random.default_rng(seed)
    feed = {}
    cached = past is not None and any(is_past_input(spec) for spec in specs)
    for spec in specs:
        shape = tuple(batch if axis == 0 else (dim if isinstance(dim, int) else seq) for axis, dim in enumerate(spec.shape))
        if cached and is_past_input(spec):
            feed[spec.name] = rng.standard_normal((batch, spec.shape[1], past, spec.shape[3])).astype(spec.dtype)
        elif cached and spec.name == "position_ids":
            feed[spec.name] = np.broadcast_to(np.arange(past, past + seq, dtype=spec.dtype), (batch, seq)).copy()
        elif cached and MASK_NAME_PATTERN.search(spec.name):
            feed[spec.name] = np.ones((batch, past + seq), spec.dtype)
        elif np.issubdtype(spec.dtype, np.integer):
            if MASK_NAME_PATTERN.search(spec.name):
                feed[spec.name] = np.ones(shape, spec.dtype)
            elif "type" in spec.name:
                feed[spec.name] = np.zeros(shape, spec.dtype)
            else:
                feed[spec.name] = rng.integers(*TOKEN_ID_RANGE, size=shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feed[spec.name] = np.ones(shape, np.bool_)
        else:
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feed


def check_input_memory(needed_bytes: int, what: str, fix: str) -> None:
    """The one memory guard of everything that times (bench, profile, latency plans): OptionError before any
    allocation when `what` needs more than this machine's memory allows for inputs."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed_bytes > memory / MEMORY_SHARE_FOR_INPUTS:
        raise OptionError(f"{what} needs {needed_bytes / 2**30:.1f} GiB for the inputs alone, more than this "
                          f"machine's {memory / 2**30:.1f} GiB allows; {fix}")
