"""The numpy sampler draws exactly the ids of the inverse-CDF rule its docstring states (one
uniform per row, over the ids still possible, float64 cumulative mass), so a faster form of it
keeps every seed's pieces."""

from __future__ import annotations

import bisect
import math

import numpy as np

from aurl.generation.sampling import NEG_INF, SamplingOptions, sample_numpy


def reference(logits: np.ndarray, u: np.ndarray) -> list[int]:
    """Row by row in plain Python: the first possible id whose cumulative mass passes u."""
    out = []
    for row, x in zip(logits.tolist(), u.tolist()):
        ids = [i for i, v in enumerate(row) if v != NEG_INF]
        top = max(row[i] for i in ids)
        cdf, total = [], 0.0
        for i in ids:
            total += math.exp(row[i] - top)
            cdf.append(total)
        out.append(ids[min(bisect.bisect_right(cdf, x * total), len(ids) - 1)])
    return out


def test_sample_numpy_draws_the_inverse_cdf_ids() -> None:
    """300 batches of 3 rows of masked logits (a few dozen ids possible, as under the grammar):
    the same ids as the reference fed the same uniforms."""
    data, draws, uniforms = (
        np.random.default_rng(7),
        np.random.default_rng(11),
        np.random.default_rng(11),
    )
    for _ in range(300):
        logits = (data.standard_normal((3, 774)) * 3).astype(np.float32)
        logits[data.random((3, 774)) < 0.95] = NEG_INF
        logits[:, 5] = 0.0  # never a row with nothing possible
        got = sample_numpy(logits, SamplingOptions(), draws).tolist()
        assert got == reference(logits, uniforms.random(3))
