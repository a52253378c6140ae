"""The fast kernel and store writer against frozen references: the same bits as before.

``_reference_simulate`` is the kernel as it was before it was tuned for speed (3-D slices of
a zero-padded buffer, one block of runs), kept here to compare with on random configs; the
SHA-256 sums were computed with that code (``smoe`` at 1523683) before anything changed, for
the frames and for every file of the stores it wrote.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from smoe.core.chunk_sums import record_chunk_sums
from smoe.families.heat.mask import generate_mask
from smoe.families.heat.simulation import (
    HeatParams,
    _set_sources,
    diffusivity_map,
    initial_fields,
    plan_runs,
    simulate,
    simulate_plan,
)
from smoe.families.heat.store import compressors, heat_dataset, simulate_split, store_attrs


def _reference_simulate(initial, mask, params, plan, dtype=np.float32):
    """All frames, computed the way the kernel did before it was made fast (as float64 to
    see the arithmetic's own values: float32 hides most differences in the last bits)."""
    runs, height, width = initial.shape
    coefficient = diffusivity_map(mask, params.diffusivity)
    centre = 1.0 - 4.0 * coefficient
    frames = np.empty((runs, params.steps + 1, height, width), dtype=dtype)
    frames[:, 0] = initial
    current = np.zeros((runs, height + 2, width + 2))
    following = np.zeros_like(current)
    current[:, 1:-1, 1:-1] = initial
    wrap = params.boundary == "wrap"

    def fill_halo(padded):
        padded[:, 0, 1:-1] = padded[:, -2, 1:-1]
        padded[:, -1, 1:-1] = padded[:, 1, 1:-1]
        padded[:, 1:-1, 0] = padded[:, 1:-1, -2]
        padded[:, 1:-1, -1] = padded[:, 1:-1, 1]

    if wrap:
        fill_halo(current)
    neighbours = np.empty((runs, height, width))
    for step in range(1, params.steps + 1):
        np.add(current[:, :-2, 1:-1], current[:, 2:, 1:-1], out=neighbours)
        neighbours += current[:, 1:-1, :-2]
        neighbours += current[:, 1:-1, 2:]
        neighbours *= coefficient
        interior = following[:, 1:-1, 1:-1]
        np.multiply(current[:, 1:-1, 1:-1], centre, out=interior)
        interior += neighbours
        if params.heat_rate and step % params.heat_rate == 0:
            _set_sources(interior, plan)
        if params.clip is not None:
            np.clip(interior, params.clip[0], params.clip[1], out=interior)
        if wrap:
            fill_halo(following)
        frames[:, step] = interior
        current, following = following, current
    return frames


def _random_config(rng):
    types = int(rng.integers(1, 5))
    options = [0.0, 0.0025, 0.025, 0.1234567, 0.2, 0.25]
    params = {
        "diffusivity": tuple(float(a) for a in rng.choice(options, types)),
        "steps": int(rng.integers(1, 13)),
        "boundary": str(rng.choice(["zero", "wrap"])),
        "init": str(rng.choice(["uniform", "zero"])),
        "negative_sources": bool(rng.integers(2)),
        "heat_rate": int(rng.integers(0, 4)),
    }
    if rng.integers(2):
        params["clip"] = (float(rng.uniform(-1, 0.2)), float(rng.uniform(0.3, 1)))
    if rng.integers(2):
        lows = rng.uniform(-1, 1, types)
        params["init_ranges"] = tuple((float(lo), float(lo + rng.uniform(0, 2))) for lo in lows)
    shape = (int(rng.integers(types, 14)), int(rng.integers(1, 14)))
    return HeatParams(**params).validate(), shape


@pytest.mark.parametrize("case", range(24))
def test_kernel_is_bit_identical_to_the_reference_kernel(case):
    rng = np.random.default_rng(1000 + case)
    params, shape = _random_config(rng)
    mask = generate_mask(*shape, params.types, seed=case)
    if len(np.unique(mask)) < params.types:  # every region type needs a cell for sources
        mask.flat[: params.types] = np.arange(params.types)
    runs = int(rng.integers(1, 10))
    plan = plan_runs(mask, params, case, runs)
    initial = initial_fields(mask, params, plan)
    # Compared as bits: -0.0 and +0.0 differ, NaNs would have to match exactly.
    expected = _reference_simulate(initial, mask, params, plan, np.float64).view(np.uint64)
    for block_runs in (None, 1, 3, 32):
        ours = np.empty(expected.shape, dtype=np.float64)
        simulate(initial, mask, params, plan, block_runs=block_runs, out=ours)
        np.testing.assert_array_equal(ours.view(np.uint64), expected)
    stored = simulate(initial, mask, params, plan).view(np.uint32)
    np.testing.assert_array_equal(
        stored, _reference_simulate(initial, mask, params, plan).view(np.uint32)
    )


# name: (params, runs, seed, mask shape, runs per chunk)
CONFIGS = {
    "paper": (dict(diffusivity=(0.0025, 0.025, 0.25), steps=12), 7, 42, (16, 12), 2),
    "wrap-clip-negative-rate": (
        dict(
            diffusivity=(0.01, 0.2, 0.25, 0.0),
            steps=9,
            boundary="wrap",
            negative_sources=True,
            clip=(-0.5, 0.7),
            heat_rate=3,
        ),
        5,
        7,
        (10, 13),
        3,
    ),
    "zero-init-rate-ranges": (
        dict(
            diffusivity=(0.1, 0.05),
            steps=7,
            init="zero",
            heat_rate=2,
            init_ranges=((0.2, 0.3), (-0.1, 0.4)),
        ),
        3,
        3,
        (9, 9),
        1,
    ),
    "ranges-clip-negative": (
        dict(
            diffusivity=(0.25, 0.125, 0.03),
            steps=6,
            init_ranges=((0.0, 1.0), (-1.0, 0.5), (0.3, 0.3)),
            clip=(0.05, 0.6),
            negative_sources=True,
        ),
        6,
        11,
        (8, 17),
        4,
    ),
}

# SHA-256 computed with the code before the speed-up: of the frames (float32, C order); of
# the stores' files (path -> sha256 as sorted JSON, the root zarr.json without its
# "source" attribute, which names the smoe version); of the field's chunk files alone. The
# store sums were retaken when the stores gained consolidated root metadata, and again when
# the root zarr.json gained the record of every chunk file's size and CRC-32 (attribute
# smoe_chunk_sums, smoe.core.chunk_sums); the chunk sums did not change either time.
FROZEN = {
    "paper": {
        "frames": "31618f3431aec93354ab0270c4ac19b25f2a59109eb836092005caa1b4ef2938",
        "store": "ef9d8c46306027adfc104f7193ea1cd98e729530d20abff2a3e21d5d3110b15a",
        "field_chunks": "b3b8889bdf611a1c26d016d21f0df887200f85588a343ff973bd3124eccd73e3",
    },
    "wrap-clip-negative-rate": {
        "frames": "9109731b2e202838e7b7b5c4360711024ead3c848638dc507183553a7a1e020d",
        "store": "14531da7e1c8652a1a3fe440fd865001ea8ed5e4caac58dbe0ba3c16dea569a5",
        "field_chunks": "2fb14a7848719dee100f07ba78cdec9e7a888caa88e0b8cb10f036c5db6e3c9b",
    },
    "zero-init-rate-ranges": {
        "frames": "682f34b420f670ddf0c0ebea25e69f4d2742adee853bfaac791b1d806bc2c394",
        "store": "f3a89d2c2c50c1cb38bcadeecaecdf29672dff1cc1cf45663031fe1234034ed3",
        "field_chunks": "651d51541b4dea58f44a0a67fa93a76b00fc92a6cfb70d8efd0c29e94adf16fe",
    },
    "ranges-clip-negative": {
        "frames": "31c7eb9b4ad31adee447e2ea1389390680ee49abb6538480344a9aaa9bd4eb09",
        "store": "a1ba7eff4a32e9dba77dc099b40540497b4118a219b5116e2772b034e7449f63",
        "field_chunks": "aa0dd174aada98301eb61d79d8e983d96e5944293bdc78680609e59b699f7ec0",
    },
}
FROZEN_BLOSC = "1.21.7.dev"
"""The c-blosc the stores' sums were taken with: compressed bytes are only comparable under
the same compressor library (the frames' sums do not depend on it)."""


def _config(name):
    params, runs, seed, shape, per_chunk = CONFIGS[name]
    params = HeatParams(**params).validate()
    return params, runs, seed, generate_mask(*shape, params.types, seed=seed), per_chunk


def _file_sums(store: Path) -> dict[str, str]:
    sums = {}
    for path in sorted(store.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path == store / "zarr.json":
                meta = json.loads(data)
                meta["attributes"].pop("source")
                data = json.dumps(meta, sort_keys=True).encode()
            sums[str(path.relative_to(store))] = hashlib.sha256(data).hexdigest()
    return sums


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("name", CONFIGS)
def test_frames_equal_the_frozen_sums(name):
    params, runs, seed, mask, _ = _config(name)
    frames = simulate_plan(mask, params, plan_runs(mask, params, seed, runs))
    assert hashlib.sha256(frames.tobytes()).hexdigest() == FROZEN[name]["frames"]


def _reference_store(mask, params, seed, runs, per_chunk, out: Path, compression="lz4") -> None:
    """The store written the plain way: xarray's metadata, then the whole field at once
    through zarr's default write path, frames from the reference kernel, then the record of
    the chunks' sums and zarr's consolidation of the metadata into the root zarr.json."""
    plan = plan_runs(mask, params, seed, runs)
    attrs = store_attrs(params, "train", seed, runs, "")
    ds = heat_dataset(mask, params, plan, per_chunk, attrs)
    encoding = {"u": {"chunks": ds["u"].data.chunksize, "compressors": compressors(compression)}}
    ds.to_zarr(out, mode="w-", zarr_format=3, consolidated=False, encoding=encoding, compute=False)
    initial = initial_fields(mask, params, plan)
    zarr.open_array(out / "u", mode="r+")[:] = _reference_simulate(initial, mask, params, plan)
    record_chunk_sums(out)  # each chunk file's size and CRC-32, as every store writer records
    with pytest.warns(UserWarning, match="Consolidated metadata"):  # zarr's own, on v3
        zarr.consolidate_metadata(str(out), zarr_format=3)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("workers", [1, 2])
def test_store_files_equal_the_reference_writer_and_the_frozen_sums(tmp_path, name, workers):
    params, runs, seed, mask, per_chunk = _config(name)
    ours = tmp_path / "ours.zarr"
    simulate_split(
        mask, params, seed, runs, ours, runs_per_chunk=per_chunk, workers=workers, progress=False
    )
    reference = tmp_path / "reference.zarr"
    _reference_store(mask, params, seed, runs, per_chunk, reference)
    sums = _file_sums(ours)
    assert sums == _file_sums(reference)
    from numcodecs import blosc

    if blosc.VERSION_STRING != FROZEN_BLOSC:
        pytest.skip(
            f"frozen store sums taken with c-blosc {FROZEN_BLOSC}, not {blosc.VERSION_STRING}"
        )
    field = {key: value for key, value in sums.items() if key.startswith("u/c/")}
    assert _sha(field) == FROZEN[name]["field_chunks"]
    assert _sha(sums) == FROZEN[name]["store"]


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_other_compressions_give_the_reference_writers_files(tmp_path, compression):
    params, runs, seed, mask, per_chunk = _config("wrap-clip-negative-rate")
    ours = tmp_path / "ours.zarr"
    simulate_split(
        mask,
        params,
        seed,
        runs,
        ours,
        runs_per_chunk=per_chunk,
        workers=2,
        compression=compression,
        progress=False,
    )
    reference = tmp_path / "reference.zarr"
    _reference_store(mask, params, seed, runs, per_chunk, reference, compression)
    assert _file_sums(ours) == _file_sums(reference)


@pytest.mark.parametrize("case", range(8))
def test_compiled_loop_gives_the_numpy_kernels_bits(case, monkeypatch):
    """Without re-injected heat or clipping the update runs as smoe.families.heat.heat_loop's
    compiled loop; switched off, the numpy kernel must give the same float64 bits."""
    from smoe.families.heat import heat_loop

    assert heat_loop.available(), "numba is a dependency: the compiled loop must run"
    rng = np.random.default_rng(2000 + case)
    params, shape = _random_config(rng)
    params = HeatParams(**{**params.__dict__, "heat_rate": 0, "clip": None}).validate()
    mask = generate_mask(*shape, params.types, seed=case)
    if len(np.unique(mask)) < params.types:
        mask.flat[: params.types] = np.arange(params.types)
    plan = plan_runs(mask, params, case, int(rng.integers(1, 6)))
    initial = initial_fields(mask, params, plan)
    calls = []
    compiled = heat_loop.diffuse
    monkeypatch.setattr(heat_loop, "diffuse", lambda *a: calls.append(1) or compiled(*a))
    ours = np.empty((len(initial), params.steps + 1, *shape), dtype=np.float64)
    simulate(initial, mask, params, plan, out=ours)
    assert calls, "the compiled loop was not used"
    monkeypatch.setattr(heat_loop, "available", lambda: False)
    numpy_kernel = np.empty_like(ours)
    simulate(initial, mask, params, plan, out=numpy_kernel)
    np.testing.assert_array_equal(ours.view(np.uint64), numpy_kernel.view(np.uint64))
