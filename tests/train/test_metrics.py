"""MetricAccumulator against a direct numpy computation, and the paper's sanity figures."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smoe.core.errors import InputError
from smoe.core.metrics import is_better
from smoe.families.heat.mask import generate_mask
from smoe.families.heat.metrics import MetricAccumulator, close_name
from smoe.families.heat.reference import reference_stencil
from smoe.families.heat.simulation import HeatParams, plan_runs, simulate_plan

SCALE = (0.01, 0.1, 1.0)


def numpy_metrics(pred, target, mask, rtols, scale):
    """Every metric, written out directly from its definition (float64 numpy)."""
    p, y = pred[:, 0], target[:, 0]  # [B, H, W]
    types = int(mask.max()) + 1
    groups = [("", np.ones(mask.shape, dtype=bool))]
    groups += [(f"mask{t}-", mask == t) for t in range(types)]
    out = {}
    for prefix, where in groups:
        d = (p - y)[:, where]  # [B, n]
        yy = y[:, where]
        mse = np.mean(d**2)
        out[prefix + "mse"] = mse
        out[prefix + "mae"] = np.mean(np.abs(d))
        out[prefix + "rmse"] = np.sqrt(mse)
        out[prefix + "nrmse"] = np.mean(np.linalg.norm(d, axis=1) / np.linalg.norm(yy, axis=1))
        out[prefix + "vrmse"] = np.sqrt(mse / np.var(yy))
        for rtol in rtols:
            name = f"prcntclose{100 * rtol:.1f}"
            out[prefix + name] = 100 * np.mean(np.abs(d) <= 1e-8 + rtol * np.abs(yy))
            factor = np.asarray(scale)[mask][where]
            hits = np.abs(d) <= 1e-8 + rtol * factor * np.abs(yy)
            out[prefix + name + "s"] = 100 * np.mean(hits)
    return out


@pytest.fixture(scope="module")
def random_batch():
    rng = np.random.default_rng(7)
    mask = rng.integers(0, 3, size=(7, 9))
    mask[0, :3] = [0, 1, 2]  # every type present
    target = rng.normal(0.5, 1.0, size=(13, 1, 7, 9))
    # Relative errors of a few percent: prcntclose is neither 0 nor 100 at any rtol below.
    pred = target * (1 + rng.normal(0, 0.02, size=target.shape))
    # Points where only the absolute tolerance 1e-8 decides.
    target[:, 0, 1, 1] = 0.0
    pred[:, 0, 1, 1] = 5e-9
    target[:, 0, 2, 2] = 0.0
    pred[:, 0, 2, 2] = 2e-8
    target[:, 0, 3, 3] = 0.0
    pred[:, 0, 3, 3] = 1e-8  # exactly on the bound: close
    return mask, pred, target


def test_accumulator_matches_numpy_over_several_batches(random_batch):
    mask, pred, target = random_batch
    rtols = (0.01, 0.001, 0.05)
    accumulator = MetricAccumulator(torch.from_numpy(mask), rtols, SCALE)
    for start, stop in [(0, 5), (5, 6), (6, 13)]:
        accumulator.update(torch.from_numpy(pred[start:stop]), torch.from_numpy(target[start:stop]))
    ours = accumulator.compute()
    expected = numpy_metrics(pred, target, mask, rtols, SCALE)
    assert set(ours) == set(expected)
    assert {"prcntclose1.0", "prcntclose1.0s", "prcntclose0.1", "mask2-prcntclose5.0s"} <= set(ours)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, rel=1e-10, abs=1e-14), name
    # The data really exercise the tolerances: strictly between 0 and 100 %, and the scaled
    # variant is stricter than the plain one except in region 2 (scale 1).
    assert 10 < ours["prcntclose1.0"] < 90
    assert ours["mask0-prcntclose1.0s"] < ours["mask0-prcntclose1.0"]
    assert ours["mask2-prcntclose1.0s"] == ours["mask2-prcntclose1.0"]
    assert ours["prcntclose0.1"] < ours["prcntclose1.0"] < ours["prcntclose5.0"]


def test_absolute_tolerance_decides_at_zero_targets():
    mask = torch.tensor([[0, 1, 2]])
    target = torch.zeros(1, 1, 1, 3)
    pred = torch.tensor([[[[5e-9, 2e-8, 1e-8]]]], dtype=torch.float64)  # 1e-8: on the bound
    accumulator = MetricAccumulator(mask, (0.01,), SCALE)
    accumulator.update(pred, target)
    out = accumulator.compute()
    assert out["mask0-prcntclose1.0"] == 100.0
    assert out["mask1-prcntclose1.0"] == 0.0
    assert out["mask2-prcntclose1.0"] == 100.0
    assert out["prcntclose1.0"] == pytest.approx(200 / 3)
    assert out["mask2-prcntclose1.0s"] == 100.0


def test_reset_and_batch_split_do_not_matter(random_batch):
    mask, pred, target = random_batch
    whole = MetricAccumulator(torch.from_numpy(mask), (0.01,), SCALE)
    whole.update(torch.from_numpy(pred), torch.from_numpy(target))
    split = MetricAccumulator(torch.from_numpy(mask), (0.01,), SCALE)
    split.update(torch.from_numpy(target), torch.from_numpy(pred))  # forgotten by reset()
    split.reset()
    for i in range(len(pred)):
        split.update(torch.from_numpy(pred[i : i + 1]), torch.from_numpy(target[i : i + 1]))
    a, b = whole.compute(), split.compute()
    assert a.keys() == b.keys()
    for name in a:
        assert b[name] == pytest.approx(a[name], rel=1e-12), name


def test_without_region_scale_there_is_no_scaled_variant(random_batch):
    mask, pred, target = random_batch
    accumulator = MetricAccumulator(torch.from_numpy(mask), (0.01,), None)
    accumulator.update(torch.from_numpy(pred), torch.from_numpy(target))
    out = accumulator.compute()
    assert "prcntclose1.0" in out and "mask1-prcntclose1.0" in out
    assert not any(name.endswith("s") for name in out)


def test_accumulator_rejects_bad_use():
    mask = torch.tensor([[0, 1], [2, 0]])
    with pytest.raises(ValueError, match="2 values for 3 region types"):
        MetricAccumulator(mask, (0.01,), (0.1, 1.0))
    with pytest.raises(ValueError, match="no predictions"):
        MetricAccumulator(mask).compute()


def test_close_names():
    assert close_name(0.01) == "prcntclose1.0"
    assert close_name(0.001) == "prcntclose0.1"
    assert close_name(0.01, scaled=True) == "prcntclose1.0s"
    assert close_name(0.05) == "prcntclose5.0"
    assert close_name(0.1) == "prcntclose10.0"


def test_distinct_rtols_never_share_a_metric():
    mask = torch.tensor([[0, 1], [2, 0]])
    try:
        accumulator = MetricAccumulator(mask, (0.001, 0.0012))
    except (ValueError, InputError):
        return  # rejecting ambiguous tolerances is fine too
    y = torch.ones(2, 1, 2, 2)
    accumulator.update(y, y)
    out = accumulator.compute()
    close = {name: value for name, value in out.items() if name.startswith("prcntclose")}
    assert len(close) == 2
    assert all(value == 100.0 for value in close.values())


def test_is_better():
    assert is_better(0.5, None, "max") and is_better(0.5, None, "min")
    assert is_better(2.0, 1.0, "max") and not is_better(1.0, 2.0, "max")
    assert is_better(1.0, 2.0, "min") and not is_better(2.0, 1.0, "min")
    # A tie is no improvement: the earlier epoch stays the best.
    assert not is_better(1.0, 1.0, "max") and not is_better(1.0, 1.0, "min")


@pytest.fixture(scope="module")
def paper_test_pairs():
    """The paper's test split: 64 x 64 seed-42 map, 20 runs of seed 865124, pairs (t, t+1)."""
    mask = generate_mask(64, 64, 3, 42)
    params = HeatParams((0.0025, 0.025, 0.25))
    frames = simulate_plan(mask, params, plan_runs(mask, params, 865124, 20))
    x = torch.from_numpy(frames[:, :-1]).reshape(-1, 1, 64, 64)
    y = torch.from_numpy(frames[:, 1:]).reshape(-1, 1, 64, 64)
    return torch.from_numpy(mask), x, y


def _close_figures(mask, pred, target):
    accumulator = MetricAccumulator(mask, (0.01,), SCALE)
    for start in range(0, len(pred), 500):
        accumulator.update(pred[start : start + 500], target[start : start + 500])
    out = accumulator.compute()
    return round(out["prcntclose1.0"], 2), round(out["prcntclose1.0s"], 2)


def test_paper_test_split_sanity_figures(paper_test_pairs):
    mask, x, y = paper_test_pairs
    assert len(x) == 2000
    # Persistence: u(t+1) = u(t).
    assert _close_figures(mask, x, y) == (87.71, 41.84)
    # One stencil everywhere, the slowest region's a = 0.0025 (zero boundary).
    stencil = torch.from_numpy(reference_stencil(0.0025)).float()[None, None]
    one_stencil = F.conv2d(x, stencil, padding=1)
    assert _close_figures(mask, one_stencil, y) == (91.15, 77.43)
