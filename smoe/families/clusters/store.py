"""Zarr stores of the synthetic-cluster data: one store per split, written atomically.

``clusters.py`` knows arrays; this module knows files. A split (``train`` or ``test``) is
one zarr v3 store (its metadata consolidated, like the heat stores) written with xarray under
``<name>.partial`` and renamed into place only when complete. It holds

- ``x(sample, patch, dim)`` float32, the inputs (already times ``scale``);
- ``label(sample)`` int64 in {0, 1}, ``cluster(sample)`` int64;
- how each sample was made: ``patch_kind(sample, patch)`` int8, ``alpha``, ``beta``,
  ``gamma`` float64, ``noise_cluster`` int64, ``noise_sign`` int8 (all over ``sample``);
- the generating vectors ``signal(k, dim)`` and ``centre(k, dim)`` float64 (the dimension
  is ``k`` because ``cluster`` already names the per-sample variable);

and in its attributes the setting, the seed, the split, the sample count and the package
version, flat and as JSON (``generator_json``), so a store says how it was made. A split of
the paper's size is 13 MB and is read eagerly into numpy by :func:`open_cluster_split`.
"""

from __future__ import annotations

import hashlib
import json
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
from smoe.families.clusters.data import (
    PATCH_KINDS,
    ClusterSample,
    ClusterSetting,
    check_split,
    generate_split,
    sample,
    stream,
    vectors_for_seed,
)

SAMPLE_CHUNK = 4096
"""Samples per stored chunk: 800 KB of ``x`` at the paper's patch size."""

SAMPLE_VARIABLES = {
    "x": ("sample", "patch", "dim"),
    "label": ("sample",),
    "cluster": ("sample",),
    "patch_kind": ("sample", "patch"),
    "alpha": ("sample",),
    "beta": ("sample",),
    "gamma": ("sample",),
    "noise_cluster": ("sample",),
    "noise_sign": ("sample",),
}
VECTOR_VARIABLES = {"signal": ("k", "dim"), "centre": ("k", "dim")}
VARIABLES = {**SAMPLE_VARIABLES, **VECTOR_VARIABLES}
"""Every array a store must hold, with its dimensions."""

DTYPES = {
    "x": np.float32,
    "label": np.int64,
    "cluster": np.int64,
    "patch_kind": np.int8,
    "alpha": np.float64,
    "beta": np.float64,
    "gamma": np.float64,
    "noise_cluster": np.int64,
    "noise_sign": np.int8,
    "signal": np.float64,
    "centre": np.float64,
}


def regenerate_hint(path: str | Path) -> str:
    """How to rebuild a damaged or inconsistent store."""
    return f"regenerate the store: rm -r {path} then rerun snakemake"


@dataclass(frozen=True, eq=False)
class ClusterData:
    """One split read from its store: numpy arrays plus how they were made."""

    path: Path
    split: str
    seed: int
    setting: ClusterSetting
    x: np.ndarray
    label: np.ndarray
    cluster: np.ndarray
    patch_kind: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    gamma: np.ndarray
    noise_cluster: np.ndarray
    noise_sign: np.ndarray
    signal: np.ndarray
    centre: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @property
    def provenance(self) -> dict[str, Any]:
        """:func:`cluster_provenance` of this split."""
        return cluster_provenance(self)


def store_attrs(setting: ClusterSetting, seed: int, split: str) -> dict[str, Any]:
    """Global attributes: CF basics plus every generator parameter, flat and as JSON."""
    samples = setting.samples(split)
    generator = {"split": split, "seed": int(seed), "samples": samples, **setting.to_dict()}
    flat = setting.to_dict()
    flat["setting"] = flat.pop("name")
    return {
        "title": f"synthetic clusters (Chen et al. 2022), setting {setting.name}, {split} split",
        "Conventions": "CF-1.10",
        "source": f"smoe {__version__} (smoe.families.clusters.store)",
        "history": "smoe.families.clusters.store.write_cluster_split",
        "references": "Chen, Deng, Wu, Gu, Li: Towards Understanding Mixture of Experts in "
        "Deep Learning, NeurIPS 2022, arXiv:2208.02813",
        "comment": "random streams: numpy SeedSequence(seed).spawn(3) = vectors, train, test",
        "smoe_version": __version__,
        "split": split,
        "seed": int(seed),
        "samples": samples,
        **flat,
        "generator_json": json.dumps(generator, sort_keys=True),
    }


def cluster_dataset(
    setting: ClusterSetting, seed: int, split: str, samples: ClusterSample, signal, centre
) -> xr.Dataset:
    """The split's Dataset (numpy-backed: the data are small)."""
    n = len(samples)
    one = {"units": "1"}
    kinds = " ".join(PATCH_KINDS)
    coords = {
        "sample": ("sample", np.arange(n), {"long_name": "sample index within the split"}),
        "patch": ("patch", np.arange(setting.patches), {"long_name": "patch position"}),
        "dim": ("dim", np.arange(setting.dim), {"long_name": "coordinate within a patch"}),
        "k": ("k", np.arange(setting.clusters), {"long_name": "cluster index"}),
    }
    data_vars = {
        "x": (
            SAMPLE_VARIABLES["x"],
            samples.x,
            {"long_name": f"input patches, times scale {setting.scale:g}", **one},
        ),
        "label": (
            ("sample",),
            samples.label,
            {"long_name": "class label (0 for y = -1, 1 for y = +1)", **one},
        ),
        "cluster": (("sample",), samples.cluster, {"long_name": "cluster index k", **one}),
        "patch_kind": (
            SAMPLE_VARIABLES["patch_kind"],
            samples.patch_kind,
            {
                "long_name": "kind of the patch at each position",
                "flag_values": list(range(len(PATCH_KINDS))),
                "flag_meanings": kinds,
            },
        ),
        "alpha": (
            ("sample",),
            samples.alpha,
            {"long_name": "feature-signal strength alpha (before scale)", **one},
        ),
        "beta": (
            ("sample",),
            samples.beta,
            {"long_name": "cluster-centre strength beta (before scale)", **one},
        ),
        "gamma": (
            ("sample",),
            samples.gamma,
            {"long_name": "feature-noise strength gamma (before scale)", **one},
        ),
        "noise_cluster": (
            ("sample",),
            samples.noise_cluster,
            {"long_name": "cluster k' whose signal is the feature noise", **one},
        ),
        "noise_sign": (
            ("sample",),
            samples.noise_sign,
            {"long_name": "sign eps of the feature noise", **one},
        ),
        "signal": (
            VECTOR_VARIABLES["signal"],
            signal,
            {"long_name": "label signal vector v_k (unit length)", **one},
        ),
        "centre": (
            VECTOR_VARIABLES["centre"],
            centre,
            {"long_name": "cluster centre vector c_k (unit length)", **one},
        ),
    }
    return xr.Dataset(data_vars, coords=coords, attrs=store_attrs(setting, seed, split))


def write_cluster_split(
    setting: ClusterSetting,
    seed: int,
    split: str,
    out: str | Path,
    overwrite: bool = False,
) -> Path:
    """Generate one split and write it as a zarr store at ``out`` (atomically).

    An existing store at ``out`` is replaced only with ``overwrite``; anything else there
    (a file, a folder that is not a zarr store) is refused, with or without it, before any
    work, as for the heat stores.
    """
    setting.validate()
    check_split(split)
    stream(seed, split)  # validates the seed
    out = Path(out)
    if out.suffix != ".zarr":
        raise InputError(f"output {str(out)!r}: a store's name must end in .zarr")
    check_store_output(out, overwrite)
    vectors, samples = generate_split(setting, seed, split)
    ds = cluster_dataset(setting, seed, split, samples, vectors.signal, vectors.centre)
    chunk = min(SAMPLE_CHUNK, len(samples))
    encoding = {}
    for name, dims in VARIABLES.items():
        shape = ds[name].shape
        encoding[name] = {"chunks": (chunk, *shape[1:]) if dims[0] == "sample" else shape}
    with atomic_directory(out) as partial:
        ds.to_zarr(partial, mode="w-", zarr_format=3, consolidated=False, encoding=encoding)
        finish_store(partial)
    return out


def _generator_record(path: Path, attrs: dict[str, Any]) -> tuple[ClusterSetting, int, str, int]:
    """The setting, seed, split and sample count a store records, or an InputError."""
    name = repr(str(path))
    text = attrs.get("generator_json")
    try:
        record = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise InputError(
            f"store {name} has no readable generator record (attribute generator_json), so "
            f"it does not say how it was made; {regenerate_hint(path)}"
        )
    record = dict(record)
    try:
        split, seed, samples = record.pop("split"), record.pop("seed"), record.pop("samples")
        setting = ClusterSetting.from_dict(record).validate(f"store {name}: generator_json")
    except (KeyError, TypeError) as exc:
        raise InputError(
            f"store {name}: attribute generator_json is incomplete ({type(exc).__name__}: "
            f"{one_line(exc)}); {regenerate_hint(path)}"
        ) from exc
    if split not in ("train", "test") or not isinstance(seed, int) or not isinstance(samples, int):
        raise InputError(
            f"store {name}: attribute generator_json has split {split!r}, seed {seed!r}, "
            f"samples {samples!r}; {regenerate_hint(path)}"
        )
    return setting, seed, split, samples


def _chunk_keys(name: str, array) -> list[str]:
    import itertools
    import math

    grid = [math.ceil(n / c) for n, c in zip(array.shape, array.chunks, strict=True)]
    return [
        f"{name}/{array.metadata.encode_chunk_key(coords)}"
        for coords in itertools.product(*(range(n) for n in grid))
    ]


def _read_array(path: Path, name: str) -> np.ndarray:
    """One variable, checked for metadata, dimensions, dtype and every chunk, then read.

    zarr reads a missing chunk as the fill value without a word, so chunks are checked first.
    """
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
    dims = tuple(meta.get("dimension_names") or ())
    if dims != VARIABLES[name]:
        raise InputError(
            f"store {store}: array {name!r} has dimensions {dims}, expected "
            f"{VARIABLES[name]}; {hint}"
        )
    try:
        array = zarr.open_array(path / name, mode="r")
        missing = [key for key in _chunk_keys(name, array) if not (path / key).is_file()]
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


def open_cluster_split(path: str | Path) -> ClusterData:
    """Read a finished split store eagerly, with a clear error when it is missing, unfinished,
    damaged, or disagrees in shape with its own record of how it was made."""
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
    setting, seed, split, samples = _generator_record(path, attrs)
    arrays = {variable: _read_array(path, variable) for variable in VARIABLES}
    expected = {
        "sample": samples,
        "patch": setting.patches,
        "dim": setting.dim,
        "k": setting.clusters,
    }
    for variable, dims in VARIABLES.items():
        want = tuple(expected[d] for d in dims)
        if arrays[variable].shape != want:
            raise InputError(
                f"store {name}: array {variable!r} has shape {arrays[variable].shape}, but the "
                f"store records {want} {dims}; {hint}"
            )
    for variable, high in (("label", 2), ("cluster", setting.clusters)):
        values = arrays[variable]
        if values.size and (values.min() < 0 or values.max() >= high):
            raise InputError(
                f"store {name}: array {variable!r} holds values outside 0..{high - 1}; {hint}"
            )
    return ClusterData(
        path=path,
        split=split,
        seed=seed,
        setting=setting,
        attrs=without_chunk_sums(attrs),
        **arrays,
    )


def _digest(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for values in arrays:
        digest.update(array_digest(values).encode())
    return digest.hexdigest()


def cluster_provenance(data: ClusterData) -> dict[str, Any]:
    """What a split was made from, for resume checks (compare records with ``==``).

    The generator record (setting without the other split's size, split, seed, sample
    count), the shape of ``x``, and SHA-256 digests of the generating vectors and of the
    samples (``x``, ``label``, ``cluster``: 13 MB at the paper's size, about 20 ms). Combine
    with :func:`smoe.core.provenance.fingerprint` for a short key.
    """
    setting = data.setting.to_dict()
    setting.pop("n_train")
    setting.pop("n_test")
    return {
        "generator": {"split": data.split, "seed": data.seed, "samples": len(data), **setting},
        "shape": [int(n) for n in data.x.shape],
        "vectors_sha256": _digest(data.signal, data.centre),
        "data_sha256": _digest(data.x, data.label, data.cluster),
    }


def cluster_inconsistencies(data: ClusterData, atol: float = 1e-9) -> list[str]:
    """Where a split disagrees with what its recorded setting and seed generate.

    The split is generated again (a few tens of ms at the paper's size) and compared: labels,
    clusters and patch kinds exactly, vectors and inputs to ``atol`` relative to ``scale``
    (a different LAPACK build may change the QR factor's last bits). Any difference means the
    store was edited, assembled from parts or made by other generator code.
    """
    problems = []
    vectors = vectors_for_seed(data.setting, data.seed)
    for name in ("signal", "centre"):
        if not np.allclose(getattr(data, name), getattr(vectors, name), rtol=0, atol=atol):
            problems.append(f"its {name} vectors differ from those seed {data.seed} gives")
    fresh = sample(data.setting, vectors, len(data), stream(data.seed, data.split))
    for name in ("label", "cluster", "patch_kind", "noise_cluster", "noise_sign"):
        if not np.array_equal(getattr(data, name), getattr(fresh, name)):
            count = int(np.sum(getattr(data, name) != getattr(fresh, name)))
            problems.append(f"{count} value(s) of {name} differ from what seed {data.seed} gives")
    # float32 inputs: a last-bit change of a vector may round an input the other way.
    close = np.isclose(data.x, fresh.x, rtol=1e-6, atol=1e-6 * data.setting.scale)
    if not close.all():
        count = int(np.sum(~close.all(axis=(1, 2))))
        problems.append(
            f"the inputs x of {count} sample(s) differ from what seed {data.seed} gives"
        )
    return problems
