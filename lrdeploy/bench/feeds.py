"""Synthetic inputs for timing: token ids, full attention masks, random floats, at a chosen batch × sequence."""

from __future__ import annotations

import numpy as np

from lrdeploy.calib.data import MASK_NAME_PATTERN, InputSpec

TOKEN_ID_RANGE = (1, 64)  # small ids are valid in any vocabulary; timing does not depend on their values


def timing_feed(specs: list[InputSpec], batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A feed with axis 0 = batch, other dynamic axes = seq, static axes as the model says.

    Masks are all ones (no padding, the worst case); other integer inputs get small token ids.
    """
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in specs:
        shape = tuple(batch if axis == 0 else (dim if isinstance(dim, int) else seq) for axis, dim in enumerate(spec.shape))
        if np.issubdtype(spec.dtype, np.integer):
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
