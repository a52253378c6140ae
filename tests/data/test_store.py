import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import xarray as xr

from smoe.data.choices import chunk_runs, task_runs
from smoe.data.heat import HeatParams, plan_runs, simulate_plan
from smoe.data.store import export_netcdf, open_store, simulate_split
from smoe.errors import InputError

PARAMS = HeatParams((0.0025, 0.025, 0.25), steps=8)


@pytest.fixture(scope="module")
def store(tmp_path_factory, small_mask):
    out = tmp_path_factory.mktemp("store") / "val.zarr"
    simulate_split(
        small_mask,
        PARAMS,
        seed=9,
        runs=7,
        out=out,
        split="val",
        runs_per_chunk=2,
        workers=2,
        progress=False,
        mask_source="small.npy",
    )
    return out


def test_store_layout_and_metadata(store, small_mask):
    ds = open_store(store)
    assert dict(ds.sizes) == {"run": 7, "time": 9, "y": 12, "x": 10, "region": 3, "source": 3}
    assert ds["u"].dims == ("run", "time", "y", "x")
    assert ds["u"].dtype == np.float32
    assert ds["u"].encoding["chunks"] == (2, 9, 12, 10)
    for name in ("u", "diffusivity", "n_sources", "source_value"):
        assert ds[name].attrs["units"] == "1" and ds[name].attrs["long_name"], name
    np.testing.assert_array_equal(ds["mask"].values, small_mask)
    assert ds["mask"].attrs["flag_meanings"] == "region_0 region_1 region_2"
    np.testing.assert_array_equal(ds["diffusivity"].values, PARAMS.diffusivity)
    assert (ds["seed"].values == 9).all()
    assert ds.attrs["Conventions"] == "CF-1.10"
    assert ds.attrs["split"] == "val" and ds.attrs["runs"] == 7 and ds.attrs["seed"] == 9
    generator = json.loads(ds.attrs["generator_json"])
    assert generator["diffusivity"] == list(PARAMS.diffusivity)
    assert generator["mask_source"] == "small.npy" and generator["steps"] == 8
    zarr_json = json.loads((store / "zarr.json").read_text())
    assert zarr_json["zarr_format"] == 3


def test_store_holds_the_simulation(store, small_mask):
    ds = open_store(store)
    expected = simulate_plan(small_mask, PARAMS, plan_runs(small_mask, PARAMS, 9, 7))
    np.testing.assert_array_equal(ds["u"].values, expected)
    # Every recorded source carries its value in frame 0.
    for run in range(7):
        n = int(ds["n_sources"][run])
        ys = ds["source_y"].values[run, :, :n].ravel()
        xs = ds["source_x"].values[run, :, :n].ravel()
        values = ds["source_value"].values[run, :, :n].ravel()
        np.testing.assert_array_equal(ds["u"].values[run, 0, ys, xs], values)
        assert (ds["source_y"].values[run, :, n:] == -1).all()


@pytest.mark.parametrize(
    "options",
    [
        {"workers": 1, "runs_per_chunk": 7, "scheduler": "synchronous"},
        {"workers": 2, "runs_per_chunk": 1, "scheduler": "threads", "compression": "none"},
        {"workers": 2, "runs_per_chunk": 3, "scheduler": "processes", "compression": "zstd"},
        {"workers": 2, "runs_per_chunk": 2, "scheduler": "distributed"},
    ],
    ids=["synchronous", "threads", "processes", "distributed"],
)
def test_result_does_not_depend_on_workers_or_chunks(tmp_path, store, small_mask, options):
    out = simulate_split(
        small_mask, PARAMS, seed=9, runs=7, out=tmp_path / "val.zarr", progress=False, **options
    )
    ours = open_store(out)
    assert ours["u"].encoding["chunks"][0] == options["runs_per_chunk"]
    np.testing.assert_array_equal(ours["u"].values, open_store(store)["u"].values)


def test_chunk_and_task_sizes():
    assert chunk_runs(100, 64, 64) == 5  # 1.65 MB per run, chunks of about 8 MiB
    assert chunk_runs(10, 4096, 4096) == 1
    assert task_runs(1000, 5, workers=2) == 35
    assert task_runs(20, 5, workers=2) == 5  # enough tasks for both workers
    assert task_runs(1, 1, workers=4) == 1


def test_netcdf_export_round_trip(tmp_path, store):
    out = export_netcdf(store, tmp_path / "val.nc", progress=False)
    with xr.open_dataset(out) as nc:
        zarr_ds = open_store(store)
        np.testing.assert_array_equal(nc["u"].values, zarr_ds["u"].values)
        np.testing.assert_array_equal(nc["mask"].values, zarr_ds["mask"].values)
        assert nc["u"].attrs["units"] == "1"
        assert nc.attrs["generator_json"] == zarr_ds.attrs["generator_json"]
        assert nc.attrs["diffusivity"].tolist() == list(PARAMS.diffusivity)
    assert not (tmp_path / "val.nc.partial").exists()


def test_bad_input_fails_before_touching_the_output(tmp_path, small_mask):
    out = tmp_path / "train.zarr"
    out.mkdir()
    (out / "keep").write_text("existing")
    with pytest.raises(InputError, match="above 0.25"):
        simulate_split(small_mask, HeatParams((0.1, 0.2, 0.5)), 1, 2, out, progress=False)
    with pytest.raises(InputError, match="runs must be at least 1"):
        simulate_split(small_mask, PARAMS, 1, 0, out, progress=False)
    with pytest.raises(InputError, match="outside 0..1"):
        simulate_split(small_mask, HeatParams((0.1, 0.2)), 1, 2, out, progress=False)
    with pytest.raises(InputError, match="must end in .zarr"):
        simulate_split(small_mask, PARAMS, 1, 2, tmp_path / "train.h5", progress=False)
    assert (out / "keep").read_text() == "existing"
    assert not (tmp_path / "train.zarr.partial").exists()


def test_missing_or_unfinished_store_is_named(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_store(tmp_path / "test.zarr")
    (tmp_path / "test.zarr.partial").mkdir()
    with pytest.raises(InputError, match="unfinished .partial"):
        open_store(tmp_path / "test.zarr")


def test_snakemakes_timestamp_file_is_ignored_and_nothing_else(tmp_path, store):
    # Snakemake leaves `.snakemake_timestamp` in every directory output it finishes.
    marked = tmp_path / "marked.zarr"
    shutil.copytree(store, marked)
    (marked / ".snakemake_timestamp").touch()
    with pytest.warns(UserWarning, match="snakemake_timestamp"):
        xr.open_zarr(marked, consolidated=False)  # zarr on its own warns about it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = open_store(marked)
        np.testing.assert_array_equal(ds["u"].values, open_store(store)["u"].values)
    assert [str(w.message) for w in caught] == []
    # Any other foreign file is still reported: only Snakemake's marker is known to be harmless.
    (marked / "notes.txt").write_text("not zarr")
    with pytest.warns(UserWarning, match="notes.txt"):
        open_store(marked)


def _simulate_command(mask_path, out, runs):
    return [
        sys.executable,
        "-m",
        "smoe",
        "simulate",
        "--mask",
        str(mask_path),
        "--runs",
        str(runs),
        "--seed",
        "42",
        "--steps",
        "100",
        "--runs-per-chunk",
        "2",
        "--workers",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]


@pytest.mark.slow
def test_killed_simulation_never_looks_complete_and_reruns_identically(tmp_path, paper_mask):
    mask_path = tmp_path / "mask.npy"
    np.save(mask_path, paper_mask)
    out = tmp_path / "train.zarr"
    partial = tmp_path / "train.zarr.partial"
    process = subprocess.Popen(_simulate_command(mask_path, out, 400))
    deadline = time.monotonic() + 120
    while not (partial / "u" / "c").exists():  # the first field chunk is being written
        assert process.poll() is None, "simulation ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists(), "a killed run must not leave a store under the final name"
    assert partial.exists()

    subprocess.run(_simulate_command(mask_path, out, 400), check=True)
    assert not partial.exists()
    rebuilt = open_store(out)["u"]
    plan = plan_runs(paper_mask, HeatParams(PARAMS.diffusivity), 42, 400)
    expected = simulate_plan(paper_mask, HeatParams(PARAMS.diffusivity), plan.select(396, 400))
    np.testing.assert_array_equal(rebuilt[396:].values, expected)
    np.testing.assert_array_equal(
        rebuilt[0].values,
        simulate_plan(paper_mask, HeatParams(PARAMS.diffusivity), plan.select(0, 1))[0],
    )
