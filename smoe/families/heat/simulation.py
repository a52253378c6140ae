"""Location-dependent heat diffusion: initial states and the explicit update.

One step is ``u'(p) = (1 - 4 a_p) u(p) + a_p (u_N + u_S + u_E + u_W)`` where ``a_p`` is the
diffusivity of the region type of point ``p`` (the 5-point stencil of the point's own type).
Runs are independent, so the update is vectorised over a batch of runs; it is done with
slice additions on a zero- (or wrap-) padded buffer, never with a per-run convolution. A block
of a few runs (:func:`block_runs_for`) goes through all its steps while its fields stay in a
core's cache, so main memory sees only the float32 frames written once each. Every operation
is elementwise, in the order of the update's definition, so a run's result is bit-identical
whatever batch or block it is computed in. Where numba runs (a dependency) and no heat is
re-injected nor clipped, the same arithmetic runs as one compiled loop per run instead
(:mod:`smoe.families.heat.heat_loop`, the same bits, several times fewer passes over memory).

Random draws follow the reference generator exactly: one ``numpy.random.default_rng(seed)``
per split, shared by its runs in order, and per run (1) the field ``uniform(0, 0.1, shape)``,
(2) the number of sources ``integers(1, 3, endpoint=True)``, (3) for each region type in
order ``choice(argwhere(mask == t), size=n)``. :func:`plan_runs` walks that stream once,
skipping the field draws with ``PCG64.advance`` (one 64-bit output per double), and records
where each run starts, so chunks of runs can be simulated anywhere, in any order.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from smoe.core.errors import InputError
from smoe.families.heat import heat_loop
from smoe.families.heat.choices import BOUNDARIES, INIT_KINDS

MAX_SOURCES = 3
"""Sources per region type are drawn from 1..MAX_SOURCES."""

STABLE_DIFFUSIVITY = 0.25
"""The explicit 5-point scheme is stable for 0 <= a <= 0.25."""

DEFAULT_INIT_RANGE = (0.0, 0.1)


@dataclass(frozen=True)
class HeatParams:
    """Everything that defines a heat-diffusion split except its mask, seed and run count."""

    diffusivity: tuple[float, ...]
    steps: int = 100
    boundary: str = "zero"
    init: str = "uniform"
    init_ranges: tuple[tuple[float, float], ...] | None = None
    negative_sources: bool = False
    heat_rate: int = 0
    clip: tuple[float, float] | None = None

    @property
    def types(self) -> int:
        return len(self.diffusivity)

    def validate(self, key: str = "heat") -> HeatParams:
        """Reject values that would give an unstable, ill-defined or unreadable simulation."""
        if not self.diffusivity:
            raise InputError(f"{key}.diffusivity: give one diffusivity per region type")
        for t, a in enumerate(self.diffusivity):
            if not np.isfinite(a) or a < 0:
                raise InputError(f"{key}.diffusivity[{t}]: {a} is negative or not finite")
            if a > STABLE_DIFFUSIVITY:
                raise InputError(
                    f"{key}.diffusivity[{t}]: {a} is above {STABLE_DIFFUSIVITY}, where the "
                    "explicit scheme is unstable"
                )
        if self.steps < 1:
            raise InputError(f"{key}.steps: must be at least 1, got {self.steps}")
        if self.boundary not in BOUNDARIES:
            raise InputError(f"{key}.boundary: {self.boundary!r} is not one of {BOUNDARIES}")
        if self.init not in INIT_KINDS:
            raise InputError(f"{key}.init.kind: {self.init!r} is not one of {INIT_KINDS}")
        if self.init_ranges is not None:
            if len(self.init_ranges) != self.types:
                raise InputError(
                    f"{key}.init.ranges: {len(self.init_ranges)} ranges for {self.types} "
                    "region types (one per diffusivity)"
                )
            for t, (low, high) in enumerate(self.init_ranges):
                if not (np.isfinite(low) and np.isfinite(high)) or low > high:
                    raise InputError(f"{key}.init.ranges[{t}]: [{low}, {high}] is not a range")
        if self.heat_rate < 0:
            raise InputError(f"{key}.sources.heat_rate: must be >= 0, got {self.heat_rate}")
        if self.clip is not None:
            low, high = self.clip
            if not low < high:
                raise InputError(f"{key}.clip: [{low}, {high}] needs low < high")
        return self

    def ranges(self) -> tuple[tuple[float, float], ...]:
        return self.init_ranges or (DEFAULT_INIT_RANGE,) * self.types

    def to_attrs(self) -> dict[str, Any]:
        """Flat attributes (numbers, strings, lists) that zarr and netCDF can both store."""
        ranges = self.ranges()
        attrs: dict[str, Any] = {
            "diffusivity": [float(a) for a in self.diffusivity],
            "steps": self.steps,
            "boundary": self.boundary,
            "init": self.init,
            "init_low": [float(lo) for lo, _ in ranges],
            "init_high": [float(hi) for _, hi in ranges],
            "negative_sources": int(self.negative_sources),
            "heat_rate": self.heat_rate,
        }
        if self.clip is not None:
            attrs["clip"] = [float(self.clip[0]), float(self.clip[1])]
        return attrs

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class RunPlan:
    """Where each run of a split starts in the shared random stream, and its sources.

    ``states[r]`` is the PCG64 state before run ``r``'s first draw. Sources are stored per
    run, region type and slot (``MAX_SOURCES`` slots, unused ones -1 / 0).
    """

    seed: int
    states: list[dict[str, Any]]
    n_sources: np.ndarray  # (runs,) int
    source_cells: np.ndarray  # (runs, types, MAX_SOURCES, 2) int, -1 where unused
    source_values: np.ndarray  # (runs, types, MAX_SOURCES) float64, 0 where unused

    @property
    def runs(self) -> int:
        return len(self.states)

    def select(self, start: int, stop: int) -> RunPlan:
        """The plan of runs ``start:stop`` (small enough to ship to a worker)."""
        return RunPlan(
            seed=self.seed,
            states=self.states[start:stop],
            n_sources=self.n_sources[start:stop],
            source_cells=self.source_cells[start:stop],
            source_values=self.source_values[start:stop],
        )


def diffusivity_map(mask: np.ndarray, diffusivity: tuple[float, ...]) -> np.ndarray:
    """The per-point coefficient a_{r(p)} as float64, shape of the mask."""
    return np.asarray(diffusivity, dtype=np.float64)[mask]


def _skip_doubles(bit_generator: np.random.PCG64, count: int) -> None:
    """Advance past ``count`` doubles, as ``random(count)`` would, keeping the 32-bit buffer.

    ``advance`` clears PCG64's buffered half-word, which a real field draw leaves alone (a
    double takes a whole 64-bit output); restoring it keeps later bounded-integer draws equal.
    """
    before = bit_generator.state
    bit_generator.advance(count)
    after = bit_generator.state
    after["has_uint32"] = before["has_uint32"]
    after["uinteger"] = before["uinteger"]
    bit_generator.state = after


_SIGNS = np.array([-1.0, 1.0])


def _draw_sources(
    rng: np.random.Generator, cells_by_type: list[np.ndarray], negative: bool
) -> tuple[int, np.ndarray, np.ndarray]:
    types = len(cells_by_type)
    cells = np.full((types, MAX_SOURCES, 2), -1, dtype=np.int64)
    values = np.zeros((types, MAX_SOURCES), dtype=np.float64)
    n = int(rng.integers(1, MAX_SOURCES, endpoint=True))
    # ``rng.choice(candidates, size=n)`` (uniform, with replacement) draws exactly
    # ``rng.integers(0, len(candidates), size=n, dtype=np.int64)`` and takes those rows; the
    # draw itself is a third of the cost of ``choice``'s argument checks. Same for the signs.
    for t, candidates in enumerate(cells_by_type):
        cells[t, :n] = candidates[rng.integers(0, len(candidates), size=n, dtype=np.int64)]
        if negative:
            values[t, :n] = _SIGNS[rng.integers(0, 2, size=n, dtype=np.int64)]
        else:
            values[t, :n] = 1.0
    return n, cells, values


def plan_runs(mask: np.ndarray, params: HeatParams, seed: int, runs: int) -> RunPlan:
    """Walk the split's random stream once and record each run's start state and sources."""
    if runs < 1:
        raise InputError(f"runs must be at least 1, got {runs}")
    rng = np.random.default_rng(seed)
    bit_generator = rng.bit_generator
    cells_by_type = [np.argwhere(mask == t) for t in range(params.types)]
    field_size = int(mask.size)
    states = []
    n_sources = np.zeros(runs, dtype=np.int64)
    source_cells = np.empty((runs, params.types, MAX_SOURCES, 2), dtype=np.int64)
    source_values = np.empty((runs, params.types, MAX_SOURCES), dtype=np.float64)
    for run in range(runs):
        states.append(bit_generator.state)
        if params.init == "uniform":
            _skip_doubles(bit_generator, field_size)
        n, cells, values = _draw_sources(rng, cells_by_type, params.negative_sources)
        n_sources[run], source_cells[run], source_values[run] = n, cells, values
    return RunPlan(seed, states, n_sources, source_cells, source_values)


def _set_sources(fields: np.ndarray, plan: RunPlan) -> None:
    """Write each run's source values into ``fields`` (runs, H, W), type by type."""
    for run in range(plan.runs):
        n = plan.n_sources[run]
        for t in range(plan.source_cells.shape[1]):
            cells = plan.source_cells[run, t, :n]
            fields[run, cells[:, 0], cells[:, 1]] = plan.source_values[run, t, :n]


def initial_fields(mask: np.ndarray, params: HeatParams, plan: RunPlan) -> np.ndarray:
    """Initial states (runs, H, W) float64 of the runs in ``plan``, drawn from their states."""
    fields = np.zeros((plan.runs, *mask.shape), dtype=np.float64)
    if params.init == "uniform":
        ranges = np.asarray(params.ranges(), dtype=np.float64)
        low = ranges[:, 0][mask]
        scale = (ranges[:, 1] - ranges[:, 0])[mask]
        rng = np.random.default_rng()
        for run, state in enumerate(plan.states):
            rng.bit_generator.state = state
            # Generator.uniform(low, high) computes low + (high - low) * random().
            fields[run] = low + scale * rng.random(mask.shape)
    _set_sources(fields, plan)
    return fields


BLOCK_BYTES = 768 * 2**10
"""Working set of one block of runs (two padded float64 fields and the neighbour sums): it
stays in a core's L2 cache (1 MiB or more on current x86) for all of a block's steps."""


def block_runs_for(height: int, width: int) -> int:
    """Runs per block so that a block's working set is about :data:`BLOCK_BYTES`."""
    run_bytes = 8 * (2 * (height + 2) + height) * (width + 2)
    return max(1, BLOCK_BYTES // run_bytes)


def simulate(
    initial: np.ndarray,
    mask: np.ndarray,
    params: HeatParams,
    plan: RunPlan | None = None,
    block_runs: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Run the diffusion from ``initial`` (runs, H, W) for ``params.steps`` steps.

    Returns all frames (runs, steps + 1, H, W) as float32; the arithmetic is float64.
    ``plan`` is needed only to re-inject heat at the sources (``params.heat_rate > 0``).
    ``block_runs`` (default: as many as fit in cache, :func:`block_runs_for`) trades Python
    overhead against cache size; it never changes the result. ``out`` is an optional
    array of the result's shape to fill instead of a new one: float32, or float64 to get
    the arithmetic's own values (tests compare those bit for bit).
    """
    if params.heat_rate and plan is None:
        raise ValueError("re-injecting heat (heat_rate > 0) needs the run plan's sources")
    runs, height, width = initial.shape
    shape = (runs, params.steps + 1, height, width)
    if out is None:
        frames = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype not in (np.float32, np.float64):
        raise ValueError(
            f"out must be float32 (or float64) of shape {shape}, got {out.dtype} {out.shape}"
        )
    else:
        frames = out
    if heat_loop.available() and not params.heat_rate and params.clip is None:
        coefficient = diffusivity_map(mask, params.diffusivity)
        heat_loop.diffuse(initial, coefficient, params.steps, params.boundary == "wrap", frames)
        return frames
    block_runs = min(block_runs or block_runs_for(height, width), runs)
    stencil = _PaddedStencil(mask, params, block_runs)
    for start in range(0, runs, block_runs):
        stop = min(start + block_runs, runs)
        block_plan = plan.select(start, stop) if plan is not None else None
        _simulate_block(initial[start:stop], stencil, params, block_plan, frames[start:stop])
    return frames


class _PaddedStencil:
    """The update on fields stored with a one-cell halo, flattened per run.

    A run's padded field (H + 2, W + 2) is one contiguous row of ``(H + 2) * (W + 2)``
    values, so the four neighbours of the rows 1..H (halo columns included) are four
    contiguous slices of it, offset by -(W + 2), +(W + 2), -1 and +1: every pass is one long
    vectorised loop per run. The coefficients are 0 in the halo columns, so those come out
    +0 and are reset to exactly 0 anyway (zero boundary) or refilled (wrap).

    The arithmetic, in this order, is the update's definition in float64: ``((u_N + u_S) +
    u_W) + u_E``, times ``a``, added to ``u * (1 - 4 a)``; nothing is fused or reordered,
    so every value is bit-identical to any other evaluation in that order.
    """

    def __init__(self, mask: np.ndarray, params: HeatParams, block_runs: int) -> None:
        height, width = mask.shape
        self.height, self.width, self.row = height, width, width + 2
        coefficient = diffusivity_map(mask, params.diffusivity)
        self.coefficient = np.zeros((height, self.row))
        self.coefficient[:, 1:-1] = coefficient
        self.centre = np.zeros((height, self.row))
        self.centre[:, 1:-1] = 1.0 - 4.0 * coefficient
        self.coefficient = self.coefficient.reshape(-1)
        self.centre = self.centre.reshape(-1)
        padded = (height + 2) * self.row
        self.fields = (np.zeros((block_runs, padded)), np.zeros((block_runs, padded)))
        self.neighbours = np.empty((block_runs, height * self.row))

    def views(self, field: np.ndarray) -> tuple[np.ndarray, ...]:
        """North, south, west, east and centre slices of rows 1..H, the 3-D padded view,
        its interior (H, W) and its two halo columns of rows 1..H."""
        row, count = self.row, self.height * self.row
        padded = field.reshape(len(field), self.height + 2, row)
        return (
            field[:, 0:count],
            field[:, 2 * row : 2 * row + count],
            field[:, row - 1 : row - 1 + count],
            field[:, row + 1 : row + 1 + count],
            field[:, row : row + count],
            padded,
            padded[:, 1:-1, 1:-1],
            padded[:, 1:-1, 0],
            padded[:, 1:-1, -1],
        )


def _simulate_block(
    initial: np.ndarray,
    stencil: _PaddedStencil,
    params: HeatParams,
    plan: RunPlan | None,
    frames: np.ndarray,
) -> None:
    """All steps of a block of runs, its fields kept in cache; each frame written once."""
    runs = len(initial)
    fields = [field[:runs] for field in stencil.fields]
    for field in fields:
        field.fill(0.0)
    views = [stencil.views(field) for field in fields]
    neighbours = stencil.neighbours[:runs]
    coefficient, centre = stencil.coefficient, stencil.centre
    wrap = params.boundary == "wrap"
    views[0][6][...] = initial
    if wrap:
        _fill_wrap_halo(views[0][5])
    frames[:, 0] = initial
    add, multiply = np.add, np.multiply
    for step in range(1, params.steps + 1):
        north, south, west, east, current = views[(step - 1) % 2][:5]
        _, _, _, _, following, padded, interior, first, last = views[step % 2]
        add(north, south, out=neighbours)
        add(neighbours, west, out=neighbours)
        add(neighbours, east, out=neighbours)
        multiply(neighbours, coefficient, out=neighbours)
        multiply(current, centre, out=following)
        add(following, neighbours, out=following)
        if params.heat_rate and step % params.heat_rate == 0:
            _set_sources(interior, plan)
        if params.clip is not None:
            np.clip(interior, params.clip[0], params.clip[1], out=interior)
        if wrap:
            _fill_wrap_halo(padded)
        else:
            first.fill(0.0)
            last.fill(0.0)
        frames[:, step] = interior


def _fill_wrap_halo(padded: np.ndarray) -> None:
    """Copy opposite edges into the one-cell halo so the stencil sees a periodic grid."""
    padded[:, 0, 1:-1] = padded[:, -2, 1:-1]
    padded[:, -1, 1:-1] = padded[:, 1, 1:-1]
    padded[:, 1:-1, 0] = padded[:, 1:-1, -2]
    padded[:, 1:-1, -1] = padded[:, 1:-1, 1]


def simulate_plan(mask: np.ndarray, params: HeatParams, plan: RunPlan) -> np.ndarray:
    """All frames of the runs in ``plan``: initial states drawn, then diffused."""
    initial = initial_fields(mask, params, plan)
    return simulate(initial, mask, params, plan)
