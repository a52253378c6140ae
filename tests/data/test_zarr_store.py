"""What a store writer accepts as its output path: Snakemake makes the folder of a declared
``zarr.json`` before the job and removes that file before it rebuilds a store."""

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from smoe.core.errors import InputError
from smoe.core.zarr_store import (
    check_store_output,
    consolidate,
    is_headless_store,
    store_argument,
)


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "train.zarr"
    xr.Dataset({"u": (("run", "x"), np.arange(6.0).reshape(2, 3))}).to_zarr(
        path, zarr_format=3, consolidated=False
    )
    consolidate(path)
    return path


def test_a_consolidated_store_opens_from_its_root_metadata_without_a_warning(store):
    assert '"consolidated_metadata"' in (store / "zarr.json").read_text()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = xr.open_zarr(store)  # consolidated metadata is looked for first
        np.testing.assert_array_equal(ds["u"].values, np.arange(6.0).reshape(2, 3))
    assert [str(w.message) for w in caught] == []


def test_missing_and_empty_outputs_are_taken(tmp_path):
    check_store_output(tmp_path / "new.zarr", overwrite=False)
    (tmp_path / "empty.zarr").mkdir()
    check_store_output(tmp_path / "empty.zarr", overwrite=False)


def test_a_store_whose_root_metadata_snakemake_removed_is_replaced_only_with_overwrite(store):
    (store / "zarr.json").unlink()
    assert is_headless_store(store)
    with pytest.raises(InputError, match=r"train.zarr' is a store without its root metadata"):
        check_store_output(store, overwrite=False)
    assert (store / "u" / "zarr.json").exists()  # nothing removed by the refusal
    check_store_output(store, overwrite=True)


def test_a_folder_with_anything_else_is_never_taken(store, tmp_path):
    check_store_output(store, overwrite=True)
    with pytest.raises(InputError, match="train.zarr' already exists; nothing was changed"):
        check_store_output(store, overwrite=False)
    notes = tmp_path / "notes.zarr"
    shutil.copytree(store, notes)
    (notes / "zarr.json").unlink()
    (notes / "README.txt").write_text("mine")
    assert not is_headless_store(notes)
    for overwrite in (False, True):
        with pytest.raises(InputError, match=r"notes.zarr' exists and is not a zarr store"):
            check_store_output(notes, overwrite=overwrite)
    file = tmp_path / "file.zarr"
    file.write_text("x")
    with pytest.raises(InputError, match=r"file.zarr' exists and is a file"):
        check_store_output(file, overwrite=True)


def test_a_store_is_named_by_its_folder_or_its_root_metadata(tmp_path):
    folder = tmp_path / "val.zarr"
    assert store_argument(str(folder)) == folder
    assert store_argument(str(folder / "zarr.json")) == folder  # what a rule passes
    assert store_argument("u/other.json") == Path("u/other.json")
