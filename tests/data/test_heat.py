import numpy as np
import pytest

from smoe.core.errors import InputError
from smoe.families.heat.reference import reference_generate
from smoe.families.heat.simulation import (
    HeatParams,
    diffusivity_map,
    initial_fields,
    plan_runs,
    simulate,
    simulate_plan,
)

PAPER = HeatParams((0.0025, 0.025, 0.25))


def spec_initial_states(mask, seed, runs):
    """The spec's draws, literally: uniform(0, 0.1), integers(1, 3), choice per type."""
    rng = np.random.default_rng(seed)
    states = []
    for _ in range(runs):
        field = rng.uniform(0, 0.1, mask.shape)
        n = rng.integers(1, 3, endpoint=True)
        for t in range(3):
            cells = rng.choice(np.argwhere(mask == t), size=n)
            field[cells[:, 0], cells[:, 1]] = 1.0
        states.append(field)
    return np.stack(states)


def test_initial_states_follow_the_spec_stream_exactly(paper_mask):
    plan = plan_runs(paper_mask, PAPER, seed=865124, runs=20)
    np.testing.assert_array_equal(
        initial_fields(paper_mask, PAPER, plan), spec_initial_states(paper_mask, 865124, 20)
    )


def test_paper_test_split_matches_reference_generator(paper_mask):
    params = HeatParams(PAPER.diffusivity, steps=100)
    ours = simulate_plan(paper_mask, params, plan_runs(paper_mask, params, 865124, 4))
    reference = reference_generate(paper_mask, params, 865124, 4)
    assert ours.dtype == np.float32 and ours.shape == (4, 101, 64, 64)
    np.testing.assert_array_max_ulp(ours, reference, maxulp=1)


@pytest.mark.parametrize(
    "params",
    [
        HeatParams((0.01, 0.2, 0.25), steps=12, boundary="wrap"),
        HeatParams((0.01, 0.2, 0.25), steps=12, init="zero", negative_sources=True),
        HeatParams((0.0, 0.1, 0.25), steps=12, heat_rate=4, clip=(0.0, 0.5)),
        HeatParams((0.05, 0.1, 0.15), steps=12, init_ranges=((0, 0.1), (0.5, 0.6), (1, 2))),
    ],
    ids=["wrap", "zero-init-negative", "heat-rate-clip", "init-ranges"],
)
def test_options_match_reference_generator(small_mask, params):
    ours = simulate_plan(small_mask, params, plan_runs(small_mask, params, 11, 5))
    np.testing.assert_array_max_ulp(ours, reference_generate(small_mask, params, 11, 5), maxulp=1)


def test_one_step_is_the_five_point_update(paper_mask):
    params = HeatParams(PAPER.diffusivity, steps=1)
    initial = initial_fields(paper_mask, params, plan_runs(paper_mask, params, 1, 2))
    frames = simulate(initial, paper_mask, params)
    a = diffusivity_map(paper_mask, params.diffusivity)
    padded = np.pad(initial, ((0, 0), (1, 1), (1, 1)))
    neighbours = (
        padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    )
    expected = initial + a * (neighbours - 4 * initial)
    # Computed in float64, stored as float32: equal up to the float32 rounding.
    np.testing.assert_array_max_ulp(frames[:, 1], expected.astype(np.float32), maxulp=1)
    assert not np.array_equal(frames[:, 1], frames[:, 0])


def test_result_does_not_depend_on_batching(small_mask):
    params = HeatParams((0.01, 0.1, 0.25), steps=20, heat_rate=3)
    plan = plan_runs(small_mask, params, 5, 9)
    initial = initial_fields(small_mask, params, plan)
    whole = simulate(initial, small_mask, params, plan, block_runs=32)
    single = simulate(initial, small_mask, params, plan, block_runs=1)
    np.testing.assert_array_equal(whole, single)
    # A run simulated alone equals the same run simulated among others.
    alone = simulate_plan(small_mask, params, plan.select(4, 5))
    np.testing.assert_array_equal(alone[0], whole[4])


def test_sources_and_plan_agree_with_frame_zero(paper_mask):
    params = HeatParams(PAPER.diffusivity, steps=1, negative_sources=True)
    plan = plan_runs(paper_mask, params, 3, 30)
    frames = initial_fields(paper_mask, params, plan)
    assert set(plan.n_sources.tolist()) == {1, 2, 3}
    for run in range(plan.runs):
        n = plan.n_sources[run]
        assert (plan.source_cells[run, :, n:] == -1).all()
        for t in range(3):
            cells = plan.source_cells[run, t, :n]
            assert (paper_mask[cells[:, 0], cells[:, 1]] == t).all()
            assert set(np.abs(frames[run, cells[:, 0], cells[:, 1]]).tolist()) == {1.0}
    assert {-1.0, 1.0} <= set(plan.source_values.ravel().tolist())


def test_zero_boundary_loses_heat_and_wrap_keeps_it(small_mask):
    # With one diffusivity everywhere the update is conservative on a periodic grid.
    for boundary, check in (("zero", np.less), ("wrap", np.isclose)):
        params = HeatParams((0.1, 0.1, 0.1), steps=30, boundary=boundary)
        frames = simulate_plan(small_mask, params, plan_runs(small_mask, params, 2, 3))
        totals = frames.astype(np.float64).sum(axis=(2, 3))
        assert check(totals[:, -1], totals[:, 0]).all(), boundary


@pytest.mark.parametrize(
    "params, message",
    [
        (HeatParams((0.0025, 0.3)), r"diffusivity\[1\]: 0.3 is above 0.25"),
        (HeatParams((-0.1, 0.1)), r"diffusivity\[0\]: -0.1 is negative"),
        (HeatParams(()), "one diffusivity per region type"),
        (HeatParams((0.1,), steps=0), "steps: must be at least 1"),
        (HeatParams((0.1,), boundary="reflect"), "boundary"),
        (HeatParams((0.1, 0.2), init_ranges=((0, 1),)), "1 ranges for 2 region types"),
        (HeatParams((0.1,), init_ranges=((1, 0),)), r"ranges\[0\]"),
        (HeatParams((0.1,), clip=(1.0, 1.0)), "clip"),
        (HeatParams((0.1,), heat_rate=-1), "heat_rate"),
    ],
)
def test_invalid_parameters_are_named(params, message):
    with pytest.raises(InputError, match=message):
        params.validate()


def test_exactly_stable_limit_is_accepted():
    assert HeatParams((0.0, 0.25)).validate().types == 2
