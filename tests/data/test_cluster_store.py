import json
import shutil
import warnings
from dataclasses import replace

import numpy as np
import pytest
import xarray as xr

from smoe import __version__
from smoe.core.errors import InputError
from smoe.core.provenance import fingerprint
from smoe.families.clusters import store as cluster_store
from smoe.families.clusters.data import generate_split, make_setting
from smoe.families.clusters.store import (
    VARIABLES,
    cluster_inconsistencies,
    cluster_provenance,
    open_cluster_split,
    write_cluster_split,
)

SETTING = make_setting({"setting": "s2", "n_train": 5000, "n_test": 700})


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clusters")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no zarr/xarray warnings on write
        train = write_cluster_split(SETTING, 21, "train", folder / "train.zarr")
        test = write_cluster_split(SETTING, 21, "test", folder / "test.zarr")
    return train, test


@pytest.fixture
def copy(stores, tmp_path):
    """A private copy of the train store to damage."""
    target = tmp_path / "train.zarr"
    shutil.copytree(stores[0], target)
    return target


def test_round_trip_is_bit_identical(stores):
    train, test = stores
    for path, split, n in ((train, "train", 5000), (test, "test", 700)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            data = open_cluster_split(path)
        vectors, expected = generate_split(SETTING, 21, split)
        assert len(data) == n and data.split == split and data.seed == 21
        assert data.setting == SETTING and data.path == path
        for name in ("x", "label", "cluster", "patch_kind", "alpha", "beta", "gamma"):
            ours, theirs = getattr(data, name), getattr(expected, name)
            assert ours.dtype == theirs.dtype, name
            np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_array_equal(data.noise_cluster, expected.noise_cluster)
        np.testing.assert_array_equal(data.noise_sign, expected.noise_sign)
        np.testing.assert_array_equal(data.signal, vectors.signal)
        np.testing.assert_array_equal(data.centre, vectors.centre)
        assert cluster_inconsistencies(data) == []


def test_layout_and_attributes(stores):
    train, _ = stores
    assert json.loads((train / "zarr.json").read_text())["zarr_format"] == 3
    assert (train / "zarr.json").read_text().count('"consolidated_metadata": {') == 1
    ds = xr.open_zarr(train)
    assert dict(ds.sizes) == {"sample": 5000, "patch": 4, "dim": 50, "k": 4}
    for name, dims in VARIABLES.items():
        assert ds[name].dims == dims, name
        assert ds[name].attrs["long_name"], name
    assert ds["x"].dtype == np.float32 and ds["x"].attrs["units"] == "1"
    assert ds["x"].encoding["chunks"] == (4096, 4, 50)
    assert ds["patch_kind"].attrs["flag_meanings"].split() == [
        "feature_signal",
        "cluster_centre",
        "feature_noise",
        "gaussian_noise",
    ]
    attrs = ds.attrs
    assert attrs["Conventions"] == "CF-1.10" and attrs["smoe_version"] == __version__
    assert attrs["split"] == "train" and attrs["seed"] == 21 and attrs["samples"] == 5000
    assert attrs["setting"] == "s2" and attrs["sigma_p"] == 2.0 and attrs["gamma"] == [0.5, 3.0]
    generator = json.loads(attrs["generator_json"])
    assert generator == {"split": "train", "seed": 21, "samples": 5000, **SETTING.to_dict()}
    # Every attribute survives a JSON round trip (zarr stores them as JSON).
    assert json.loads(json.dumps(dict(attrs))) == dict(attrs)


def test_provenance(stores, tmp_path):
    train, test = stores
    record = cluster_provenance(open_cluster_split(train))
    assert record["generator"] == {
        "split": "train",
        "seed": 21,
        "samples": 5000,
        **{k: v for k, v in SETTING.to_dict().items() if k not in ("n_train", "n_test")},
    }
    assert record["shape"] == [5000, 4, 50]
    assert len(record["vectors_sha256"]) == 64 and len(record["data_sha256"]) == 64
    assert json.loads(json.dumps(record)) == record
    assert open_cluster_split(train).provenance == record  # stable
    test_record = cluster_provenance(open_cluster_split(test))
    assert test_record["vectors_sha256"] == record["vectors_sha256"]
    assert test_record["data_sha256"] != record["data_sha256"]
    # The other split's size does not change this split's record.
    other = make_setting({"setting": "s2", "n_train": 5000, "n_test": 10})
    again = write_cluster_split(other, 21, "train", tmp_path / "train.zarr")
    assert cluster_provenance(open_cluster_split(again)) == record
    # Another seed does.
    seed = write_cluster_split(SETTING, 22, "train", tmp_path / "seed.zarr")
    changed = cluster_provenance(open_cluster_split(seed))
    assert changed["generator"]["seed"] == 22
    assert changed["vectors_sha256"] != record["vectors_sha256"]
    assert fingerprint(changed) != fingerprint(record)


def test_finished_store_has_no_partial_and_overwrite(stores, tmp_path):
    out = tmp_path / "test.zarr"
    write_cluster_split(SETTING, 1, "test", out)
    assert not (tmp_path / "test.zarr.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.zarr"]
    before = open_cluster_split(out)
    with pytest.raises(
        InputError, match=r"store '.*test.zarr' already exists; nothing was changed"
    ):
        write_cluster_split(SETTING, 2, "test", out)
    np.testing.assert_array_equal(open_cluster_split(out).x, before.x)
    write_cluster_split(SETTING, 2, "test", out, overwrite=True)
    assert open_cluster_split(out).seed == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.zarr"]
    # Never replaces what is not a store, even with overwrite.
    folder = tmp_path / "mine.zarr"
    folder.mkdir()
    (folder / "keep").write_text("mine")
    with pytest.raises(InputError, match="exists and is not a zarr store"):
        write_cluster_split(SETTING, 1, "test", folder, overwrite=True)
    assert (folder / "keep").read_text() == "mine"
    file = tmp_path / "file.zarr"
    file.write_text("x")
    with pytest.raises(InputError, match="exists and is a file"):
        write_cluster_split(SETTING, 1, "test", file, overwrite=True)


def test_crash_leaves_no_store(tmp_path, monkeypatch):
    out = tmp_path / "train.zarr"

    def crash(self, store, **kwargs):
        original(self, store, **kwargs)  # everything written under .partial ...
        raise KeyboardInterrupt  # ... then killed before the rename

    original = xr.Dataset.to_zarr
    monkeypatch.setattr(xr.Dataset, "to_zarr", crash)
    with pytest.raises(KeyboardInterrupt):
        write_cluster_split(SETTING, 1, "train", out)
    assert not out.exists() and not (tmp_path / "train.zarr.partial").exists()


def test_partial_is_not_mistaken_for_a_store(stores, tmp_path):
    out = tmp_path / "train.zarr"
    partial = tmp_path / "train.zarr.partial"
    shutil.copytree(stores[0], partial)  # complete contents, as a killed rename would leave
    with pytest.raises(InputError, match=r"does not exist \(an unfinished .partial store"):
        open_cluster_split(out)
    write_cluster_split(SETTING, 21, "train", out)  # the leftover is cleared, not refused
    assert not partial.exists()
    assert open_cluster_split(out).seed == 21


def test_bad_arguments_fail_before_writing(tmp_path):
    with pytest.raises(InputError, match="split 'val' is not one of train, test"):
        write_cluster_split(SETTING, 1, "val", tmp_path / "val.zarr")
    with pytest.raises(InputError, match="name must end in .zarr"):
        write_cluster_split(SETTING, 1, "train", tmp_path / "train.zarr.d")
    with pytest.raises(InputError, match="seed: must be an integer >= 0"):
        write_cluster_split(SETTING, -3, "train", tmp_path / "train.zarr")
    with pytest.raises(InputError, match=r"clusters.data.dim: 5 dimensions"):
        write_cluster_split(replace(SETTING, dim=5), 1, "train", tmp_path / "train.zarr")
    assert list(tmp_path.iterdir()) == []


def test_missing_and_non_stores(tmp_path):
    with pytest.raises(InputError, match=r"store '.*nothing.zarr' does not exist$"):
        open_cluster_split(tmp_path / "nothing.zarr")
    (tmp_path / "file.zarr").write_text("")
    with pytest.raises(InputError, match="is a file, not a zarr store"):
        open_cluster_split(tmp_path / "file.zarr")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(InputError, match=r"empty.zarr' is not a readable zarr store: its metadata"):
        open_cluster_split(tmp_path / "empty.zarr")


def test_missing_variable(copy):
    shutil.rmtree(copy / "cluster")
    with pytest.raises(InputError, match=r"store '.*train.zarr' has no array 'cluster'; regen"):
        open_cluster_split(copy)


def test_missing_chunk(copy):
    (copy / "x" / "c" / "1" / "0" / "0").unlink()
    with pytest.raises(InputError, match=r"chunk x/c/1/0/0 of array 'x' is missing"):
        open_cluster_split(copy)


def test_garbled_metadata(copy):
    (copy / "label" / "zarr.json").write_text("{not json")
    with pytest.raises(InputError, match=r"metadata label/zarr.json of array 'label' is unread"):
        open_cluster_split(copy)
    (copy / "zarr.json").write_text("")
    with pytest.raises(InputError, match="is not a readable zarr store"):
        open_cluster_split(copy)


def test_damaged_chunk(copy):
    chunk = copy / "x" / "c" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(InputError, match=r"array 'x' cannot be read .*truncated or damaged"):
        open_cluster_split(copy)


def test_missing_or_bad_generator_record(copy):
    meta_file = copy / "zarr.json"
    meta = json.loads(meta_file.read_text())
    del meta["attributes"]["generator_json"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"has no readable generator record"):
        open_cluster_split(copy)
    record = {"split": "train", "seed": 21, "samples": 5000, **SETTING.to_dict(), "dim": 3}
    meta["attributes"]["generator_json"] = json.dumps(record)
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"generator_json.dim: 3 dimensions cannot hold"):
        open_cluster_split(copy)
    record = {**record, "dim": 50, "samples": 4000}
    meta["attributes"]["generator_json"] = json.dumps(record)
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"array 'x' has shape \(5000, 4, 50\), but the store rec"):
        open_cluster_split(copy)


def test_inconsistencies_found(copy):
    data = open_cluster_split(copy)
    data.label[:3] = 1 - data.label[:3]
    data.x[10, 0, 0] += 1.0
    problems = cluster_inconsistencies(data)
    assert problems == [
        "3 value(s) of label differ from what seed 21 gives",
        "the inputs x of 1 sample(s) differ from what seed 21 gives",
    ]


def test_hint_names_the_store(copy):
    assert str(copy) in cluster_store.regenerate_hint(copy)
