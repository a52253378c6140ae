"""A literal, slow implementation of the reference generator, kept as an oracle.

It follows the description of the original code step by step (Python loops over runs and
steps, one ``scipy.signal.convolve2d`` per region type, masks to combine them), so tests can
check the fast kernel in :mod:`smoe.families.heat.simulation` against it and benchmarks can time it.
"""

from __future__ import annotations

import numpy as np

from smoe.families.heat.simulation import MAX_SOURCES, HeatParams


def reference_stencil(a: float) -> np.ndarray:
    """The 5-point stencil of one region type."""
    return np.array([[0.0, a, 0.0], [a, 1.0 - 4.0 * a, a], [0.0, a, 0.0]])


def reference_generate(mask: np.ndarray, params: HeatParams, seed: int, runs: int) -> np.ndarray:
    """All frames (runs, steps + 1, H, W) as float32, computed the original way.

    Supports the zero/wrap boundaries, uniform/zero initial fields with per-region ranges,
    negative sources, heat re-injection and clipping, with the same order of random draws.
    """
    from scipy.signal import convolve2d

    boundary = {"zero": "fill", "wrap": "wrap"}[params.boundary]
    ranges = params.ranges()
    stencils = [reference_stencil(a) for a in params.diffusivity]
    regions = [mask == t for t in range(params.types)]
    rng = np.random.default_rng(seed)
    out = np.empty((runs, params.steps + 1, *mask.shape), dtype=np.float32)
    for run in range(runs):
        if params.init == "uniform":
            unit = rng.uniform(0.0, 1.0, mask.shape)
            field = np.zeros(mask.shape)
            for t, (low, high) in enumerate(ranges):
                field[regions[t]] = (low + (high - low) * unit)[regions[t]]
        else:
            field = np.zeros(mask.shape)
        n = rng.integers(1, MAX_SOURCES, endpoint=True)
        sources = []
        for t in range(params.types):
            cells = rng.choice(np.argwhere(regions[t]), size=n)
            values = rng.choice(np.array([-1.0, 1.0]), size=n) if params.negative_sources else 1.0
            field[cells[:, 0], cells[:, 1]] = values
            sources.append((cells, values))
        out[run, 0] = field
        for step in range(1, params.steps + 1):
            new = np.zeros(mask.shape)
            for t in range(params.types):
                diffused = convolve2d(field, stencils[t], mode="same", boundary=boundary)
                new[regions[t]] = diffused[regions[t]]
            field = new
            if params.heat_rate and step % params.heat_rate == 0:
                for cells, values in sources:
                    field[cells[:, 0], cells[:, 1]] = values
            if params.clip is not None:
                field = np.clip(field, *params.clip)
            out[run, step] = field
    return out
