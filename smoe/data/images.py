"""Image classification data of the gated modular MoE family, read from the standard files.

Every reader returns ``(images, labels)``: ``images`` uint8 ``[N, H, W]`` (grey) or
``[N, H, W, C]`` (colour, channels last) and ``labels`` int64 ``[N]`` in 0..9. This module
knows files and arrays only (pure numpy); ``image_store.py`` writes the zarr stores.

- ``digits``: scikit-learn's handwritten digits (``sklearn.datasets.load_digits``, 1797
  images of 8 x 8, embedded in scikit-learn, no file needed). Its values 0..16 are scaled
  to uint8 0..255 by ``round(v * 255 / 16)`` (exact for 0 and 16), so every dataset is
  uint8 0..255. It has no official test part: see :data:`DIGITS_TEST_FRACTION`.
- ``mnist`` and ``fashion-mnist``: the four IDX files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``), each
  plain or gzipped (``.gz``), in one folder; images must be 28 x 28.
- ``cifar10``: the "python version" batches folder (``data_batch_1`` .. ``data_batch_5``,
  ``test_batch``), pickled dicts with ``b"data"`` uint8 ``[N, 3072]`` (1024 red, 1024
  green, 1024 blue values per image, rows in order) and ``b"labels"``; images come back as
  ``[N, 32, 32, 3]``. The pickles are read with an unpickler that only builds numpy arrays
  and plain containers, so a batch file cannot run code.

Any file that is missing, of the wrong kind, truncated or inconsistent raises an
:class:`InputError` naming the file (and for missing files the folder and every missing name).
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from pathlib import Path

import numpy as np

from smoe.errors import InputError, one_line

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")
"""Dataset names the readers know."""

PARTS = ("train", "test")
"""A dataset's own parts: the splits ``train``/``val`` are carved from ``train``."""

CLASSES = 10
"""Every dataset here has ten classes, labelled 0..9."""

DIGITS_TEST_FRACTION = 0.2
"""Share of the digits set held out as its test part (it has no official one)."""

DIGITS_TEST_SEED = 0
"""Seed of the permutation carving the digits test part: fixed, so every training seed is
evaluated on the same test images, as with the official test parts of the other sets."""

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
MNIST_SIZE = (28, 28)
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
CIFAR_SIZE = (32, 32, 3)


def check_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise InputError(f"dataset {dataset!r} is not known; choose one of {', '.join(DATASETS)}")
    return dataset


def check_part(part: str) -> str:
    if part not in PARTS:
        raise InputError(f"part {part!r} is not known; choose train or test")
    return part


def _check_labels(labels: np.ndarray, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= CLASSES):
        raise InputError(
            f"{where}: labels must lie in 0..{CLASSES - 1}, found {int(labels.min())}.."
            f"{int(labels.max())}"
        )
    return labels.astype(np.int64)


# --- scikit-learn digits ---------------------------------------------------------------


def digits_to_uint8(values: np.ndarray) -> np.ndarray:
    """Digits values 0..16 scaled to uint8 0..255 (``round(v * 255 / 16)``)."""
    return np.rint(np.asarray(values, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 scikit-learn digits: uint8 ``[1797, 8, 8]`` (scaled 0..255), int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = digits_to_uint8(bunch.images)
    return images, _check_labels(bunch.target, "sklearn.datasets.load_digits")


def digits_test_indices(n: int) -> np.ndarray:
    """Sorted indices of the digits test part among ``n`` images (fixed seed)."""
    permutation = np.random.default_rng(DIGITS_TEST_SEED).permutation(n)
    return np.sort(permutation[: int(round(n * DIGITS_TEST_FRACTION))])


def digits_part(part: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The digits train or test part: images, labels and their indices in ``load_digits``."""
    check_part(part)
    images, labels = read_digits()
    test = digits_test_indices(len(labels))
    if part == "test":
        index = test
    else:
        index = np.setdiff1d(np.arange(len(labels)), test)
    return images[index], labels[index], index.astype(np.int64)


# --- IDX (MNIST, Fashion-MNIST) --------------------------------------------------------


def _read_bytes(path: Path, size: int = -1) -> bytes:
    """A file's bytes (its first ``size`` bytes; all with -1), gunzipped when its name ends
    in ``.gz``; a file that cannot be read or unzipped is named in an InputError."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            return handle.read(size)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise InputError(
            f"file {str(path)!r} is not a readable gzip file ({type(exc).__name__}: "
            f"{one_line(exc)}); download it again"
        ) from exc
    except OSError as exc:
        raise InputError(
            f"file {str(path)!r} cannot be read: {exc.strerror or one_line(exc)}"
        ) from exc


def _idx_dims(path: Path, data: bytes, magic: int, ndim: int) -> tuple[int, ...]:
    """The dimensions an IDX file's header (the first bytes of ``data``) declares, checked
    against its magic number."""
    name = repr(str(path))
    kind = "images" if magic == IDX_IMAGES_MAGIC else "labels"
    header = 4 + 4 * ndim
    if len(data) < 4:
        raise InputError(f"file {name} is too short for an IDX file ({len(data)} bytes)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise InputError(
            f"file {name} has magic number {found}, expected {magic} (IDX {kind}: unsigned "
            f"bytes, {ndim} dimension(s)); is it the right file?"
        )
    if len(data) < header:
        raise InputError(
            f"file {name} is truncated: its header needs {header} bytes, it has {len(data)}"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if any(d == 0 for d in dims[1:]):
        raise InputError(f"file {name} declares dimensions {dims}: an image size of 0")
    return dims


def _idx_size_error(path: Path, dims: tuple[int, ...], size: int, modulo: bool = False) -> None:
    """Refuse an IDX file whose (uncompressed) ``size`` is not what its ``dims`` declare;
    ``modulo``: ``size`` is a gzip trailer's, known modulo 2**32."""
    expected = 4 + 4 * len(dims) + int(np.prod(dims, dtype=np.int64))
    if (expected % 2**32 if modulo else expected) == size:
        return
    state = "truncated" if size < expected else "longer than its header says"
    if modulo:
        state = "truncated or damaged (its gzip trailer disagrees with its header)"
    raise InputError(
        f"file {str(path)!r} is {state}: its header declares dimensions {dims}, so "
        f"{expected} bytes are expected (uncompressed), but it has {size}"
    )


def _idx_header(path: Path, data: bytes, magic: int, ndim: int) -> tuple[int, ...]:
    """The dimensions an IDX file declares, checked against its magic number and size."""
    dims = _idx_dims(path, data, magic, ndim)
    _idx_size_error(path, dims, len(data))
    return dims


def read_idx_images(path: str | Path) -> np.ndarray:
    """An IDX image file (magic 2051) as uint8 ``[N, rows, cols]``."""
    path = Path(path)
    data = _read_bytes(path)
    dims = _idx_header(path, data, IDX_IMAGES_MAGIC, 3)
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(dims).copy()


def read_idx_labels(path: str | Path) -> np.ndarray:
    """An IDX label file (magic 2049) as int64 ``[N]`` in 0..9."""
    path = Path(path)
    data = _read_bytes(path)
    dims = _idx_header(path, data, IDX_LABELS_MAGIC, 1)
    labels = np.frombuffer(data, dtype=np.uint8, offset=8).reshape(dims)
    return _check_labels(labels, f"file {str(path)!r}")


def _find_files(folder: Path, names: tuple[str, ...], gz: bool, what: str) -> list[Path]:
    """Each named file in ``folder`` (plain, else ``.gz`` if allowed), or an InputError
    naming the folder and every missing file."""
    if not folder.exists():
        raise InputError(f"{what} folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise InputError(f"{what} folder {str(folder)!r} is a file, not a folder")
    found, missing = [], []
    for name in names:
        candidates = [folder / name] + ([folder / f"{name}.gz"] if gz else [])
        present = [c for c in candidates if c.is_file()]
        if present:
            found.append(present[0])
        else:
            missing.append(name + (" (or .gz)" if gz else ""))
    if missing:
        raise InputError(
            f"{what} folder {str(folder)!r} lacks {len(missing)} file(s): {', '.join(missing)}"
        )
    return found


def read_mnist(folder: str | Path, part: str, dataset: str = "mnist") -> tuple:
    """MNIST or Fashion-MNIST (same format) ``train`` or ``test`` part from its IDX files:
    uint8 ``[N, 28, 28]`` and int64 labels."""
    check_part(part)
    folder = Path(folder)
    images_file, labels_file = _find_files(folder, MNIST_FILES[part], True, dataset)
    images = read_idx_images(images_file)
    if images.shape[1:] != MNIST_SIZE:
        raise InputError(
            f"file {str(images_file)!r} holds images of {images.shape[1]} x {images.shape[2]}, "
            f"expected {MNIST_SIZE[0]} x {MNIST_SIZE[1]} for {dataset}"
        )
    labels = read_idx_labels(labels_file)
    if len(labels) != len(images):
        raise InputError(
            f"{dataset} {part} part: file {str(labels_file)!r} holds {len(labels)} labels but "
            f"file {str(images_file)!r} holds {len(images)} images"
        )
    return images, labels


# --- CIFAR-10 python batches -----------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays and plain containers only: a batch file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("builtins", "bytearray"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to build {module}.{name}")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core alias
            return super().find_class(module, name)


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: uint8 ``[N, 32, 32, 3]`` and int64 labels."""
    path = Path(path)
    name = repr(str(path))
    try:
        with open(path, "rb") as handle:
            batch = _ArrayUnpickler(handle, encoding="bytes").load()
    except OSError as exc:
        raise InputError(f"file {name} cannot be read: {exc.strerror or one_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - unpickling a damaged file raises many types
        raise InputError(
            f"file {name} is not a readable CIFAR-10 python batch ({type(exc).__name__}: "
            f"{one_line(exc)}); it is truncated, damaged or of another kind"
        ) from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise InputError(f"file {name} is not a CIFAR-10 batch: no b'data' and b'labels' ({keys})")
    data, labels = batch[b"data"], batch[b"labels"]
    width = int(np.prod(CIFAR_SIZE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data)
        raise InputError(f"file {name}: b'data' is {what}, expected uint8 [N, {width}]")
    if data.shape[1] != width:
        raise InputError(
            f"file {name}: b'data' has shape {data.shape}, expected [N, {width}] "
            f"(32 x 32 x 3 values per image)"
        )
    try:
        labels = np.asarray(labels)
    except Exception:  # noqa: BLE001
        labels = np.asarray([None])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"file {name}: b'labels' is not a list of integers")
    if len(labels) != len(data):
        raise InputError(
            f"file {name}: b'labels' holds {len(labels)} labels but b'data' {len(data)} images"
        )
    images = data.reshape(len(data), 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), _check_labels(labels, f"file {name}")


def read_cifar10(folder: str | Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 ``train`` (batches 1..5 in order) or ``test`` part from its batches folder."""
    check_part(part)
    files = _find_files(Path(folder), CIFAR_FILES[part], False, "cifar10")
    batches = [read_cifar_batch(f) for f in files]
    return (
        np.concatenate([b[0] for b in batches]),
        np.concatenate([b[1] for b in batches]),
    )


# --- cheap checks, before any job runs --------------------------------------------------


def _gzip_size(path: Path) -> int:
    """The uncompressed size a gzip file's trailer records (modulo 2**32, enough here)."""
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        if handle.tell() < 18:
            raise InputError(f"file {str(path)!r} is too short for a gzip file")
        handle.seek(-4, 2)
        return int.from_bytes(handle.read(4), "little")


def _check_idx(path: Path, magic: int, ndim: int) -> tuple[int, ...]:
    """An IDX file's declared dimensions, checked against its magic number and its size
    (a gzip file's by its trailer), without reading its body."""
    dims = _idx_dims(path, _read_bytes(path, 4 + 4 * ndim), magic, ndim)
    if path.suffix == ".gz":
        _idx_size_error(path, dims, _gzip_size(path), modulo=True)
    else:
        _idx_size_error(path, dims, path.stat().st_size)
    return dims


def check_source(dataset: str, folder: str | Path | None) -> list[Path]:
    """The files a dataset is converted from, checked as far as can be done in a moment:
    present, of the right kind and magic number, of the declared size, images of the right
    shape and as many labels as images (CIFAR-10: complete pickles). Returns the files (none
    for digits). InputError names the folder, the file and what is wrong; a damaged body
    that passes these checks is still refused, naming the file, by the conversion."""
    check_dataset(dataset)
    if dataset == "digits":
        return []
    if folder is None:
        raise InputError(f"dataset {dataset!r} is read from files: give the folder holding them")
    folder = Path(folder)
    files: list[Path] = []
    if dataset == "cifar10":
        for part in PARTS:
            for path in _find_files(folder, CIFAR_FILES[part], False, "cifar10"):
                _check_pickle(path)
                files.append(path)
        return files
    for part in PARTS:
        images_file, labels_file = _find_files(folder, MNIST_FILES[part], True, dataset)
        dims = _check_idx(images_file, IDX_IMAGES_MAGIC, 3)
        if dims[1:] != MNIST_SIZE:
            raise InputError(
                f"file {str(images_file)!r} holds images of {dims[1]} x {dims[2]}, expected "
                f"{MNIST_SIZE[0]} x {MNIST_SIZE[1]} for {dataset}"
            )
        (labels,) = _check_idx(labels_file, IDX_LABELS_MAGIC, 1)
        if labels != dims[0]:
            raise InputError(
                f"{dataset} {part} part: file {str(labels_file)!r} holds {labels} labels but "
                f"file {str(images_file)!r} holds {dims[0]} images"
            )
        files += [images_file, labels_file]
    return files


def _check_pickle(path: Path) -> None:
    """A CIFAR-10 batch starts as a pickle (protocol 2+) and ends with its STOP opcode."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        first = handle.read(1)
        handle.seek(max(0, size - 1))
        last = handle.read(1)
    if first != b"\x80" or last != b".":
        state = "truncated" if first == b"\x80" else "not a pickled CIFAR-10 python batch"
        raise InputError(f"file {str(path)!r} is {state}; download the batches again")
    if size < int(np.prod(CIFAR_SIZE)):
        raise InputError(f"file {str(path)!r} is too short ({size} bytes) for a CIFAR-10 batch")


# --- one entry point -------------------------------------------------------------------


def read_part(
    dataset: str, source: str | Path | None, part: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A dataset's ``train`` or ``test`` part: images, labels, and each image's index in the
    part as the source holds it (for digits, its index in ``load_digits``)."""
    check_dataset(dataset)
    check_part(part)
    if dataset == "digits":
        return digits_part(part)
    if source is None:
        raise InputError(
            f"dataset {dataset!r} is read from files: give the folder holding them "
            f"({', '.join(MNIST_FILES[part] if dataset != 'cifar10' else CIFAR_FILES[part])})"
        )
    if dataset == "cifar10":
        images, labels = read_cifar10(source, part)
    else:
        images, labels = read_mnist(source, part, dataset)
    return images, labels, np.arange(len(labels), dtype=np.int64)
