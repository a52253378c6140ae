"""The checks the workflow runs on a planned run's inputs before any job (smoe.core.integrity,
smoe.core.store_check, smoe.core.file_checks, smoe.core.chunk_sums, the gated family's source
check): real files written by the real writers, then damaged as a disk or a user would."""

import gzip
import json
import pickle
import shutil
import warnings
import zipfile

import numpy as np
import pytest
import torch
import xarray as xr

from smoe.core.chunk_sums import CHUNK_SUMS, chunk_sums
from smoe.core.file_checks import (
    checkpoint_problem,
    csv_problem,
    json_problem,
    netcdf_problem,
    npy_problem,
)
from smoe.core.integrity import PlannedJob, damaged_inputs, restart_warnings
from smoe.core.store_check import store_problems
from smoe.core.zarr_store import consolidate, finish_store
from smoe.families.gated.images import check_source
from smoe.families.gated.source_check import source_problem


def dataset() -> xr.Dataset:
    """Arrays of every kind the stores hold: a float field (NaN fill), integers (0 fill),
    one compressed by blosc, the others by zarr's default zstd or not at all."""
    rng = np.random.default_rng(0)
    return xr.Dataset(
        {
            "u": (("run", "x"), rng.random((6, 500)).astype(np.float32)),
            "label": (("run",), np.arange(6, dtype=np.int64)),
            "raw": (("run", "x"), rng.random((6, 500))),
            "zeros": (("run",), np.zeros(6, dtype=np.int16)),
        }
    )


def write(path, record: bool = True):
    from zarr.codecs import BloscCodec

    encoding = {
        "u": {"chunks": (2, 500), "compressors": (BloscCodec(cname="lz4"),)},
        "label": {"chunks": (3,)},
        "raw": {"chunks": (3, 500), "compressors": None},
        "zeros": {"chunks": (6,)},
    }
    dataset().to_zarr(path, zarr_format=3, consolidated=False, encoding=encoding)
    (finish_store if record else consolidate)(path)
    return path


@pytest.fixture(params=[True, False], ids=["recorded", "unrecorded"])
def store(request, tmp_path):
    return write(tmp_path / "s.zarr", record=request.param)


def test_a_whole_store_has_no_problem_and_its_record_stays_out_of_the_data(tmp_path):
    path = write(tmp_path / "s.zarr")
    assert store_problems(path) == []
    root = json.loads((path / "zarr.json").read_text())
    assert root["attributes"][CHUNK_SUMS] == chunk_sums(path)
    assert "u/c/0/0" in root["attributes"][CHUNK_SUMS]["files"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xr.testing.assert_identical(xr.open_zarr(path).drop_attrs(), dataset())


@pytest.mark.parametrize(
    "key, message",
    [
        ("u/c/1/0", "but its blosc header says"),
        ("label/c/1", "but its zstd frame is"),
        ("raw/c/0/0", "but it holds 12000"),  # uncompressed: the size is exact
    ],
)
def test_a_truncated_chunk_is_named(store, key, message):
    chunk = store / key
    data = chunk.read_bytes()
    chunk.write_bytes(data[:-5])
    (problem,) = store_problems(store)
    assert problem.startswith(f"chunk {key} is {len(data) - 5} bytes, but ")
    if CHUNK_SUMS in json.loads((store / "zarr.json").read_text())["attributes"]:
        assert problem.endswith(f"but {len(data)} were written")
    else:
        assert message in problem


def test_a_missing_chunk_is_named_unless_zarr_may_have_skipped_it(store):
    assert not (store / "zeros" / "c" / "0").exists()  # all fill value (0): zarr skipped it
    (store / "u" / "c" / "2" / "0").unlink()  # NaN fill: the data never are, so it was lost
    assert store_problems(store) == ["chunk u/c/2/0 is missing"]


def test_bytes_damaged_without_changing_the_size_are_seen_through_the_record(tmp_path):
    path = write(tmp_path / "s.zarr")
    chunk = path / "u" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert store_problems(path) == [
        "chunk u/c/0/0 has other bytes than were written (its CRC-32 differs)"
    ]


def test_garbled_metadata_is_named(store):
    (store / "label" / "zarr.json").write_text("{not json")
    assert "metadata label/zarr.json is garbled" in store_problems(store)
    shutil.rmtree(store / "raw")
    assert "metadata raw/zarr.json is missing" in store_problems(store)
    (store / "zarr.json").write_text("[]")
    assert store_problems(store) == ["its root metadata zarr.json is garbled or not a group's"]


def checkpoint(path):
    torch.save({"format": 2, "model": {"w": torch.arange(300.0), "n": torch.tensor(3)}}, path)
    return path


def test_a_whole_checkpoint_passes_and_damage_is_named(tmp_path):
    path = checkpoint(tmp_path / "best.pt")
    assert checkpoint_problem(path) is None
    data = path.read_bytes()
    path.write_bytes(data[:-50])
    assert checkpoint_problem(path).startswith("not a readable zip archive")
    damaged = bytearray(data)
    start = data.index(b"\x00\x00\x80\x3f")  # the value 1.0 in the stored tensor
    damaged[start + 3] ^= 0xFF
    path.write_bytes(bytes(damaged))
    assert "Bad CRC-32" in checkpoint_problem(path)


def test_a_checkpoint_archive_missing_a_tensor_or_its_pickle_is_named(tmp_path):
    path = checkpoint(tmp_path / "best.pt")
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    stored = sorted(name for name in entries if "/data/" in name)
    missing = ((stored[0], "is missing from the archive"), ("best/data.pkl", "holds no data.pkl"))
    for drop, message in missing:
        with zipfile.ZipFile(tmp_path / "other.pt", "w") as archive:
            for name, content in entries.items():
                if name != drop:
                    archive.writestr(name, content)
        assert message in checkpoint_problem(tmp_path / "other.pt")


def test_reading_a_checkpoints_pickle_runs_none_of_its_code(tmp_path, capsys):
    class Loud:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"x": Loud()}))
    assert checkpoint_problem(path) is None  # read with stand-ins: nothing printed or built
    assert capsys.readouterr().out == ""


def test_json_csv_npy_and_netcdf_checks(tmp_path):
    (tmp_path / "m.json").write_text('{"a": 1}')
    assert json_problem(tmp_path / "m.json") is None
    (tmp_path / "m.json").write_text('{"a": ')
    assert json_problem(tmp_path / "m.json").startswith("not JSON (")
    (tmp_path / "h.csv").write_text("epoch,loss\n0,1.5\n1,1.25\n")
    assert csv_problem(tmp_path / "h.csv") is None
    (tmp_path / "h.csv").write_text("epoch,loss\n0,1.5\n1,1.2")
    assert csv_problem(tmp_path / "h.csv") == "truncated: its last row has no line end"
    (tmp_path / "h.csv").write_text("epoch,loss\n0,1.5\n1\n")
    assert csv_problem(tmp_path / "h.csv") == "row 3 has 1 fields, the header 2"
    np.save(tmp_path / "m.npy", np.zeros((4, 4), dtype=np.int64))
    assert npy_problem(tmp_path / "m.npy") is None
    (tmp_path / "m.npy").write_bytes((tmp_path / "m.npy").read_bytes()[:-8])
    assert "but its header declares" in npy_problem(tmp_path / "m.npy")
    nc = tmp_path / "e.nc"
    dataset().to_netcdf(nc, engine="netcdf4", format="NETCDF4")
    assert netcdf_problem(nc) is None
    nc.write_bytes(nc.read_bytes()[:-100])
    assert netcdf_problem(nc).startswith("truncated: ")
    nc.write_bytes(b"not a netcdf file at all")
    assert netcdf_problem(nc).startswith("not a netCDF file")


def test_only_inputs_this_run_reads_without_rewriting_are_checked_each_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a.json", "b.json", "source.dat"):
        (tmp_path / name).write_text("garbled")
    jobs = [
        PlannedJob("make_b", ("x.npy",), ("b.json",)),
        PlannedJob("table", ("a.json", "b.json"), ("t.csv",), frozenset({"a.json", "b.json"})),
        PlannedJob("figure", ("a.json",), ("f.png",), frozenset({"a.json"})),
        PlannedJob("convert", ("source.dat",), ("s.zarr/zarr.json",)),
    ]
    assert damaged_inputs(jobs, {}) == [
        "damaged input a.json: not JSON (Expecting value: line 1 column 1 (char 0)); no job was "
        "started and nothing was deleted: regenerate it: rerun snakemake with --forcerun a.json "
        "(its job runs again, then every job that reads it)"
    ]
    lines = damaged_inputs(jobs, {"convert": lambda path: "its body is damaged"})
    assert lines[-1] == (
        "damaged input source.dat: its body is damaged; no job was started and nothing was "
        "deleted: replace it with a good copy, then rerun snakemake"
    )


def test_an_input_that_cannot_be_read_is_refused_naming_the_reason(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "e.nc").mkdir()  # a folder where the export is expected
    job = PlannedJob("figure", ("e.nc",), ("f.png",), frozenset({"e.nc"}))
    (line,) = damaged_inputs([job], {})
    assert line.startswith("damaged input e.nc: cannot be read (cannot use 'e.nc': Is a directory)")


def test_a_damaged_store_is_named_with_the_command_that_rebuilds_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "train.zarr")
    (tmp_path / "train.zarr" / "u" / "c" / "0" / "0").unlink()
    job = PlannedJob(
        "export", ("train.zarr/zarr.json",), ("train.nc",), frozenset({"train.zarr/zarr.json"})
    )
    assert damaged_inputs([job], {}) == [
        "damaged input train.zarr: chunk u/c/0/0 is missing; no job was started and nothing "
        "was deleted: regenerate it: rm -r train.zarr, then rerun snakemake"
    ]


def test_a_training_with_an_unreadable_last_checkpoint_is_warned_about(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    job = PlannedJob("train", ("s.zarr/zarr.json",), ("m/best.pt", "m/train.json"))
    assert restart_warnings([job]) == []
    checkpoint(tmp_path / "m" / "last.pt")
    assert restart_warnings([job]) == []
    (tmp_path / "m" / "last.pt").write_bytes(b"PK\x03\x04 cut short")
    (line,) = restart_warnings([job])
    assert line.startswith("m/last.pt cannot be resumed (not a readable zip archive")
    assert line.endswith("the training of m (rule train) starts from scratch")


def idx_labels(labels) -> bytes:
    return (2049).to_bytes(4, "big") + len(labels).to_bytes(4, "big") + bytes(labels)


def mnist(folder, labels=(0, 1, 2, 9)):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)  # stored as is
        header = (2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in images.shape)
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as handle:
            handle.write(header + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as handle:
            handle.write(idx_labels(labels))
    return folder


def test_a_source_file_is_read_whole_by_its_conversions_reader(tmp_path):
    folder = mnist(tmp_path / "m")
    images = folder / "train-images-idx3-ubyte.gz"
    assert source_problem(images) is None
    data = bytearray(images.read_bytes())
    data[len(data) // 2] ^= 0xFF
    images.write_bytes(bytes(data))
    check_source("mnist", folder)  # header and size still agree
    assert "is not a readable gzip file" in source_problem(images)
    batch = tmp_path / "data_batch_1"
    rows = np.zeros((2, 3072), dtype=np.uint8)
    batch.write_bytes(pickle.dumps({b"data": rows, b"labels": [1, 11]}, protocol=2))
    assert "labels must lie in 0..9, found 1..11" in source_problem(batch)
    assert source_problem(tmp_path / "notes.txt") is None
