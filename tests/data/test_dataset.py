import json
import pickle
import shutil

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from smoe.core.errors import InputError
from smoe.families.heat.dataset import HeatPairs, Normalizer, loader, worker_context
from smoe.families.heat.mask import generate_mask
from smoe.families.heat.simulation import HeatParams
from smoe.families.heat.store import open_store, simulate_split

PARAMS = HeatParams((0.01, 0.1, 0.25), steps=6)
RUNS, FRAMES, HEIGHT, WIDTH = 4, 7, 12, 10


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    mask = generate_mask(HEIGHT, WIDTH, 3, seed=5)
    out = tmp_path_factory.mktemp("pairs") / "train.zarr"
    # Two runs per chunk, so lazy reads cross chunk boundaries.
    return simulate_split(
        mask, PARAMS, seed=11, runs=RUNS, out=out, runs_per_chunk=2, progress=False
    )


@pytest.fixture(scope="module")
def field(store):
    return open_store(store)["u"].values


def expected_item(field, mask, run, t, context, mask_channel):
    frames = [field[run, t - k] for k in range(context + 1)]
    if mask_channel:
        frames.append(mask.astype(np.float32) / 2)
    return np.stack(frames), field[run, t + 1][None]


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "lazy"])
@pytest.mark.parametrize("context,mask_channel", [(0, False), (2, True)])
def test_items_are_the_stored_frames(store, field, eager, context, mask_channel):
    ds = HeatPairs(store, context=context, mask_channel=mask_channel, eager=eager)
    mask = open_store(store)["mask"].values
    per_run = FRAMES - 1 - context
    assert ds.eager is eager
    assert len(ds) == RUNS * per_run and ds.pairs_per_run == per_run
    assert ds.in_channels == 1 + context + mask_channel
    assert (ds.runs, ds.height, ds.width) == (RUNS, HEIGHT, WIDTH)
    assert ds.diffusivity == PARAMS.diffusivity and ds.store_path == store
    assert ds.mask.dtype == torch.int64
    np.testing.assert_array_equal(ds.mask.numpy(), mask)
    for i in range(len(ds)):
        run, t = ds.pair_index(i)
        assert (run, t) == (i // per_run, i % per_run + context)
        x, y = ds[i]
        want_x, want_y = expected_item(field, mask, run, t, context, mask_channel)
        assert x.dtype == y.dtype == torch.float32
        assert x.shape == (ds.in_channels, HEIGHT, WIDTH) and y.shape == (1, HEIGHT, WIDTH)
        np.testing.assert_array_equal(x.numpy(), want_x)
        np.testing.assert_array_equal(y.numpy(), want_y)
    if mask_channel:
        assert set(np.unique(ds[0][0][-1].numpy())) == {0.0, 0.5, 1.0}
    with pytest.raises(IndexError):
        ds[len(ds)]
    np.testing.assert_array_equal(ds[-1][1].numpy(), field[-1, -1][None])


def test_eager_and_lazy_agree_with_a_normalizer(store):
    norm = Normalizer.fit(store, "zscore")
    eager = HeatPairs(store, context=1, mask_channel=True, normalizer=norm, eager=True)
    lazy = HeatPairs(store, context=1, mask_channel=True, normalizer=norm, eager=False)
    assert len(eager) == len(lazy)
    for i in [*range(len(lazy)), 3, 0, len(lazy) - 1]:  # forwards, then back across chunks
        for a, b in zip(eager[i], lazy[i], strict=True):
            assert torch.equal(a, b)
    for (xe, ye), (xl, yl) in zip(
        eager.batches(4, shuffle=False), lazy.batches(4, shuffle=False), strict=True
    ):
        assert torch.equal(xe, xl) and torch.equal(ye, yl)


def as_rows(batches):
    """Each sample as bytes, sorted: compares what was served regardless of order."""
    rows = []
    for x, y in batches:
        rows += [xi.numpy().tobytes() + yi.numpy().tobytes() for xi, yi in zip(x, y, strict=True)]
    return sorted(rows)


def test_lazy_workers_serve_every_sample_once(store):
    norm = Normalizer.fit(store, "minmax")
    lazy = HeatPairs(store, context=1, mask_channel=True, normalizer=norm, eager=False)
    eager = HeatPairs(store, context=1, mask_channel=True, normalizer=norm)
    assert eager.eager and not lazy.eager
    lazy[0]  # the parent holds a zarr handle and an event loop; workers must not inherit it
    workers = loader(lazy, 6, shuffle=True, generator=torch.Generator().manual_seed(0), workers=2)
    assert isinstance(workers, DataLoader)
    assert workers.multiprocessing_context.get_start_method() == worker_context()
    served = list(workers)
    assert [len(x) for x, _ in served] == [6, 6, 6, 2]
    assert as_rows(served) == as_rows(eager.batches(6, shuffle=False))
    # Eager data never goes through worker processes.
    assert not isinstance(loader(eager, 5, True, None, workers=2), DataLoader)


def test_lazy_dataset_pickles_only_its_path(store):
    lazy = HeatPairs(store, context=2, eager=False)
    lazy[5]
    clone = pickle.loads(pickle.dumps(lazy))
    assert clone._array is None and clone._chunk is None
    assert len(pickle.dumps(lazy)) < 4096
    for a, b in zip(clone[5], lazy[5], strict=True):
        assert torch.equal(a, b)
    assert worker_context() in ("forkserver", "spawn") and lazy.worker_context() == worker_context()


def indices_of(ds, batches):
    """Recover sample indices from served batches through the (unique) target frames."""
    lookup = {ds[i][1].numpy().tobytes(): i for i in range(len(ds))}
    assert len(lookup) == len(ds)
    return [[lookup[y.numpy().tobytes()] for y in ys] for _, ys in batches]


def test_batches_follow_the_generator(store):
    ds = HeatPairs(store, context=1)
    n = len(ds)
    order = indices_of(ds, ds.batches(4, shuffle=True, generator=torch.Generator().manual_seed(3)))
    assert sum(order, []) == torch.randperm(n, generator=torch.Generator().manual_seed(3)).tolist()
    assert sorted(sum(order, [])) == list(range(n))
    assert [len(b) for b in order] == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    again = ds.batches(4, shuffle=True, generator=torch.Generator().manual_seed(3))
    assert indices_of(ds, again) == order
    assert indices_of(ds, ds.batches(4, shuffle=False)) == [
        list(range(s, min(s + 4, n))) for s in range(0, n, 4)
    ]

    # Resuming: the state saved before an epoch replays it, and its remaining batches.
    generator = torch.Generator().manual_seed(7)
    list(ds.batches(4, True, generator))
    state = generator.get_state()
    second = indices_of(ds, ds.batches(4, True, generator))
    generator.set_state(state)
    resumed = ds.batches(4, True, generator)
    next(resumed), next(resumed)
    assert indices_of(ds, resumed) == second[2:]
    assert second != order

    dropped = indices_of(ds, ds.batches(7, True, torch.Generator().manual_seed(3), drop_last=True))
    assert [len(b) for b in dropped] == [7] * (n // 7) and n % 7
    assert len(set(sum(dropped, []))) == 7 * (n // 7)


def test_eager_batches_match_items(store):
    ds = HeatPairs(store, context=2, mask_channel=True)
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1))
    batches = list(ds.batches(6, shuffle=True, generator=torch.Generator().manual_seed(1)))
    xs, ys = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    assert xs.shape == (len(ds), 4, HEIGHT, WIDTH) and ys.shape == (len(ds), 1, HEIGHT, WIDTH)
    for k, i in enumerate(perm.tolist()):
        assert torch.equal(xs[k], ds[i][0]) and torch.equal(ys[k], ds[i][1])
    with pytest.raises(InputError, match="batch_size"):
        ds.batches(0, shuffle=False)


def test_eager_is_chosen_by_size(store):
    assert HeatPairs(store).eager
    size = RUNS * FRAMES * HEIGHT * WIDTH * 4
    assert not HeatPairs(store, max_eager_bytes=size).eager
    assert HeatPairs(store, max_eager_bytes=size + 1).eager


def test_zscore_normalizer(store, field):
    norm = Normalizer.fit(store, "zscore")
    assert norm.kind == "zscore"
    scaled = norm.normalize(field).astype(np.float64)
    assert norm.normalize(field).dtype == np.float32
    assert abs(scaled.mean()) < 1e-4 and abs(scaled.std() - 1) < 1e-4
    np.testing.assert_allclose(norm.denormalize(norm.normalize(field)), field, rtol=1e-6, atol=1e-7)
    ds = HeatPairs(store, normalizer=norm)
    np.testing.assert_allclose(norm.denormalize(ds[0][1]).numpy(), field[0, 1][None], atol=1e-7)


def test_minmax_normalizer(store, field):
    norm = Normalizer.fit(store, "minmax")
    scaled = norm.normalize(torch.from_numpy(field))
    assert scaled.dtype == torch.float32
    assert scaled.min().item() == 0.0 and scaled.max().item() == 1.0
    back = norm.denormalize(scaled).numpy()
    np.testing.assert_allclose(back, field, rtol=1e-6, atol=1e-7)
    none = Normalizer.fit(store, "none")
    assert (none.offset, none.scale) == (0.0, 1.0)
    np.testing.assert_array_equal(none.normalize(field), field)


def test_normalizer_dict_round_trip(store):
    norm = Normalizer.fit(store, "zscore")
    data = json.loads(json.dumps(norm.to_dict()))
    assert Normalizer.from_dict(data) == norm
    with pytest.raises(InputError, match="keys"):
        Normalizer.from_dict({"kind": "zscore", "offset": 0.0})


def test_unknown_normalizer_kind(store):
    with pytest.raises(InputError, match="'robust'.*'none', 'zscore', 'minmax'"):
        Normalizer.fit(store, "robust")
    with pytest.raises(InputError, match="'robust'"):
        Normalizer.from_dict({"kind": "robust", "offset": 0.0, "scale": 1.0})
    with pytest.raises(InputError, match="scale"):
        Normalizer("zscore", 0.0, 0.0)


def test_missing_store(tmp_path):
    missing = tmp_path / "nowhere.zarr"
    with pytest.raises(InputError, match="nowhere.zarr"):
        HeatPairs(missing)
    with pytest.raises(InputError, match="nowhere.zarr"):
        Normalizer.fit(missing, "zscore")


def test_too_few_frames_for_the_context(store):
    with pytest.raises(InputError, match=r"train.zarr.*7 frames.*context 6 needs at least 8"):
        HeatPairs(store, context=6)
    assert len(HeatPairs(store, context=5)) == RUNS
    with pytest.raises(InputError, match="context"):
        HeatPairs(store, context=-1)


def test_non_finite_values_are_reported(tmp_path, store):
    broken = tmp_path / "broken.zarr"
    shutil.copytree(store, broken)
    zarr.open_array(broken / "u", mode="r+")[1, 2, 3, 4] = float("nan")
    with pytest.raises(InputError, match=r"broken.zarr.*1 non-finite value.*run 1: 1"):
        HeatPairs(broken, eager=True)
    with pytest.raises(InputError, match="non-finite"):
        Normalizer.fit(broken, "zscore")
    lazy = HeatPairs(broken, eager=False)
    lazy[0]  # run 0 is clean
    per_run = lazy.pairs_per_run
    with pytest.raises(InputError, match=r"1 non-finite value.*in run 1, frames 1..2"):
        lazy[per_run + 1]
