"""The heat update as one compiled loop per run (numba), bit for bit the numpy kernel's.

The numpy kernel of :mod:`smoe.families.heat.simulation` makes seven passes over a block of
runs per step
(three additions, two products, one addition, the frame's float32 copy). Here every cell is
updated once per step, reading its four neighbours and writing the new float64 value and the
float32 frame in the same loop. The arithmetic is the update's definition in the same order,
``u * (1 - 4 a) + (((u_N + u_S) + u_W) + u_E) * a`` in float64, with no fused multiply-add
(numba leaves floating-point contraction off unless ``fastmath`` asks for it), so every value
equals the numpy kernel's; tests/data/test_simulate_frozen.py holds both to frozen hashes.

Covered: zero and wrap boundaries, without re-injected heat or clipping (the paper's and every
shipped config's physics); the numpy kernel runs the rest. Without numba the numpy kernel runs.
"""

from __future__ import annotations

import numpy as np

from smoe.core import compiled


def available() -> bool:
    """Whether the compiled loop runs (tests and benchmarks switch it off to compare)."""
    return compiled.available()


def _diffuse_runs(
    initial: np.ndarray,
    coefficient: np.ndarray,
    centre: np.ndarray,
    steps: int,
    wrap: bool,
    frames: np.ndarray,
) -> None:
    """Fill ``frames`` (runs, steps + 1, H, W) from ``initial`` (runs, H, W): one run at a
    time, its two padded float64 fields (a few tens of KiB) staying in cache for all steps."""
    runs, height, width = initial.shape
    current = np.zeros((height + 2, width + 2))
    following = np.zeros((height + 2, width + 2))
    for r in range(runs):
        current[:, :] = 0.0
        following[:, :] = 0.0
        for i in range(height):
            for j in range(width):
                current[i + 1, j + 1] = initial[r, i, j]
                frames[r, 0, i, j] = initial[r, i, j]
        for step in range(1, steps + 1):
            if wrap:
                for j in range(1, width + 1):
                    current[0, j] = current[height, j]
                    current[height + 1, j] = current[1, j]
                for i in range(1, height + 1):
                    current[i, 0] = current[i, width]
                    current[i, width + 1] = current[i, 1]
            for i in range(1, height + 1):
                for j in range(1, width + 1):
                    neighbours = (
                        (current[i - 1, j] + current[i + 1, j]) + current[i, j - 1]
                    ) + current[i, j + 1]
                    value = (
                        current[i, j] * centre[i - 1, j - 1]
                        + neighbours * coefficient[i - 1, j - 1]
                    )
                    following[i, j] = value
                    frames[r, step, i - 1, j - 1] = value
            current, following = following, current


_diffuse_runs = compiled.compiled(_diffuse_runs)


def diffuse(
    initial: np.ndarray, coefficient: np.ndarray, steps: int, wrap: bool, frames: np.ndarray
) -> None:
    """All frames of ``initial``'s runs into ``frames`` (float32, or float64 for the
    arithmetic's own values); ``coefficient`` is the diffusivity map (H, W), float64."""
    coefficient = np.ascontiguousarray(coefficient, dtype=np.float64)
    centre = 1.0 - 4.0 * coefficient
    _diffuse_runs(np.ascontiguousarray(initial), coefficient, centre, steps, wrap, frames)
