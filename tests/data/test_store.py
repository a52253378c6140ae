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

from smoe.core.errors import InputError
from smoe.families.heat.choices import chunk_runs, task_runs
from smoe.families.heat.simulation import HeatParams, plan_runs, simulate_plan
from smoe.families.heat.store import export_netcdf, open_store, simulate_split

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


def test_an_existing_output_is_replaced_only_if_it_is_a_store_and_overwrite_is_given(
    tmp_path, store, small_mask
):
    def simulate(out, **options):
        return simulate_split(small_mask, PARAMS, 3, 2, out, progress=False, **options)

    existing = tmp_path / "val.zarr"
    shutil.copytree(store, existing)
    with pytest.raises(InputError, match="already exists; nothing was changed: pass --overwrite"):
        simulate(existing)
    assert open_store(existing).sizes["run"] == 7
    simulate(existing, overwrite=True)
    assert open_store(existing).sizes["run"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val.zarr"]  # no .previous/.partial
    # Anything that is not a store is never moved aside or deleted, even with overwrite.
    (tmp_path / "file.zarr").write_text("mine")
    (tmp_path / "folder.zarr").mkdir()
    (tmp_path / "folder.zarr" / "notes.txt").write_text("mine too")
    for overwrite in (False, True):
        with pytest.raises(InputError, match="exists and is a file, not a zarr store"):
            simulate(tmp_path / "file.zarr", overwrite=overwrite)
        with pytest.raises(InputError, match="exists and is not a zarr store"):
            simulate(tmp_path / "folder.zarr", overwrite=overwrite)
    assert (tmp_path / "file.zarr").read_text() == "mine"
    assert [p.name for p in (tmp_path / "folder.zarr").iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.zarr", "folder.zarr", "val.zarr"]


def test_atomic_outputs_refuse_the_wrong_kind_before_the_block_runs(tmp_path):
    from smoe.core.atomic import atomic_directory, atomic_file, check_output

    (tmp_path / "file").write_text("mine")
    (tmp_path / "folder").mkdir()
    ran = []
    with pytest.raises(InputError, match="is a file"), atomic_directory(tmp_path / "file"):
        ran.append(1)
    with pytest.raises(InputError, match="is a folder"), atomic_file(tmp_path / "folder"):
        ran.append(1)
    with pytest.raises(InputError, match="'.*file' is a file, not a folder"):
        with atomic_file(tmp_path / "file" / "below" / "x.json"):
            ran.append(1)
    assert ran == [] and (tmp_path / "file").read_text() == "mine"
    with pytest.raises(InputError, match="is a file, not a folder"):
        check_output(tmp_path / "file" / "x.npy")
    with pytest.raises(InputError, match="is a folder, where a file is written"):
        check_output(tmp_path / "folder")
    assert check_output(tmp_path / "new" / "deeper" / "x.npy") == tmp_path / "new/deeper/x.npy"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def _damaged_copy(store, tmp_path, name):
    copy = tmp_path / name
    shutil.copytree(store, copy)
    return copy


def test_damaged_stores_are_refused_naming_the_file_or_chunk(tmp_path, store):
    missing = _damaged_copy(store, tmp_path, "missing.zarr")
    (missing / "u" / "c" / "3" / "0" / "0" / "0").unlink()
    # zarr alone reads a missing chunk as the fill value, NaN, without a word
    assert np.isnan(xr.open_zarr(missing, consolidated=False)["u"][6].values).all()
    with pytest.raises(InputError, match=r"chunk u/c/3/0/0/0 of the field is missing; regen"):
        open_store(missing)
    no_meta = _damaged_copy(store, tmp_path, "nometa.zarr")
    (no_meta / "diffusivity" / "zarr.json").unlink()
    with pytest.raises(InputError, match=r"metadata diffusivity/zarr.json .* is missing"):
        open_store(no_meta)
    garbled = _damaged_copy(store, tmp_path, "garbled.zarr")
    (garbled / "u" / "zarr.json").write_text("{")
    with pytest.raises(InputError, match=r"u/zarr.json of array 'u' is unreadable or garbled"):
        open_store(garbled)
    no_mask = _damaged_copy(store, tmp_path, "nomask.zarr")
    shutil.rmtree(no_mask / "mask")
    with pytest.raises(InputError, match="has no array 'mask'"):
        open_store(no_mask)
    with pytest.raises(InputError, match="is a file, not a zarr store"):
        open_store(tmp_path / "nomask.zarr" / "zarr.json")


def test_undecodable_chunks_are_named_when_read(tmp_path, store):
    from smoe.families.heat.store import bad_field_chunks, field_reads

    truncated = _damaged_copy(store, tmp_path, "truncated.zarr")
    chunk = truncated / "u" / "c" / "1" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:16])
    assert [key for key, _ in bad_field_chunks(truncated)] == ["u/c/1/0/0/0"]
    ds = open_store(truncated)  # the chunk exists: only reading it fails
    with pytest.raises(InputError, match=r"'.*truncated.zarr': chunk u/c/1/0/0/0 cannot be read"):
        with field_reads(truncated):
            ds["u"].values  # noqa: B018
    with pytest.raises(InputError, match="chunk u/c/1/0/0/0 cannot be read"):
        export_netcdf(truncated, tmp_path / "out.nc", progress=False)
    assert not (tmp_path / "out.nc").exists() and not (tmp_path / "out.nc.partial").exists()


def test_export_refuses_non_finite_values(tmp_path, store):
    import zarr

    broken = _damaged_copy(store, tmp_path, "nan.zarr")
    zarr.open_array(broken / "u", mode="r+")[5, 1, 2, 3:5] = [np.nan, np.inf]
    with pytest.raises(InputError, match=r"nan.zarr': field u has 2 non-finite .* \(run 5: 2\)"):
        export_netcdf(broken, tmp_path / "nan.nc", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.zarr"]


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
