"""Zarr stores of simulated runs: layout, atomic writes, dask orchestration, netCDF export.

``heat.py`` knows arrays; this module knows files. A split is one zarr v3 store (its
metadata consolidated) holding the field ``u(run, time, y, x)`` as float32 plus everything
needed to say how it was made. It is written under ``<name>.partial`` and renamed into place
only when complete, so a killed job never leaves a store that looks finished.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr
from zarr.storage import LocalStore, WrapperStore

from smoe import __version__
from smoe.core.atomic import atomic_directory, atomic_file
from smoe.core.chunk_sums import CHUNK_SUMS
from smoe.core.errors import InputError, one_line
from smoe.core.zarr_store import (
    SNAKEMAKE_TIMESTAMP,
    check_store_folder,
    check_store_output,
    finish_store,
    is_zarr_store,
    read_json_object,
)
from smoe.families.heat.choices import (
    COMPRESSIONS,
    STORE_REDO,
    chunk_runs,
    scheduler_address,
    task_runs,
)
from smoe.families.heat.mask import check_mask, mask_dataset
from smoe.families.heat.simulation import (
    MAX_SOURCES,
    HeatParams,
    RunPlan,
    initial_fields,
    plan_runs,
    simulate,
)


def compressors(name: str) -> tuple | None:
    """Zarr v3 codecs for a compression name; lz4 with byte shuffle is cheap and helps a bit."""
    from zarr.codecs import BloscCodec, ZstdCodec

    if name == "lz4":
        return (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)
    if name == "zstd":
        return (ZstdCodec(level=3),)
    if name == "none":
        return None
    raise InputError(f"compression {name!r} is not one of {COMPRESSIONS}")


def keep_freed_memory_mapped() -> bool:
    """Ask glibc to serve large blocks from its heap and keep freed memory (glibc only).

    zarr's codecs allocate a fresh multi-MiB buffer per chunk; by default glibc maps each one
    with mmap and unmaps it on free, so every chunk pays page faults again. Raising the mmap
    and trim thresholds makes those buffers reuse already-mapped memory: a third of the page
    faults and about 15 % less time for a 1000-run split here. Process-wide, so only the
    command line calls it. Returns whether the allocator accepted the settings.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 256 * 2**20)) and bool(
            libc.mallopt(m_trim_threshold, 2 * 2**30)
        )
    except (OSError, AttributeError):
        return False


_buffers = threading.local()


def _frame_buffers(runs: int, frames: int, height: int, width: int) -> list[np.ndarray]:
    """Two per-thread output buffers of ``runs`` runs each, reused across tasks.

    Allocating fresh multi-MB arrays per task costs page faults comparable to the whole
    stencil computation on small machines; reused buffers are already mapped.
    """
    shape = (runs, frames, height, width)
    buffers = getattr(_buffers, "frames", None)
    if buffers is None or buffers[0].shape[0] < runs or buffers[0].shape[1:] != shape[1:]:
        buffers = [np.empty(shape, dtype=np.float32) for _ in range(2)]
        _buffers.frames = buffers
    return buffers


def _field_writer(field_path: str):
    """The stored field, opened for writing whole chunks.

    Each chunk is written from an array of exactly its shape, so zarr encodes it without
    first copying it into a fill-value buffer, and without scanning it for being all fill
    value (NaN): a simulated chunk never is, its values are finite. Bytes are as zarr's
    default write path makes them.
    """
    import zarr

    field = zarr.open_array(field_path, mode="r+")
    if hasattr(field, "with_config"):  # zarr >= 3.1
        field = field.with_config({"write_empty_chunks": True})
    return field


def simulate_into_store(
    mask: np.ndarray, params: HeatParams, plan: RunPlan, field_path: str, start: int
) -> int:
    """One dask task: simulate the runs of ``plan`` and write them at ``start`` in the store.

    The task's runs are whole stored chunks (tasks never share a chunk). They are done chunk
    by chunk: while one chunk is computed into one buffer, a writer thread compresses and
    writes the previous one from the other, so even one worker keeps the kernel, the
    compressor and the file writes going at once, and at most two chunks of frames per
    worker are in memory.
    """
    from concurrent.futures import ThreadPoolExecutor

    field = _field_writer(field_path)
    per_chunk = min(int(field.chunks[0]), plan.runs)
    buffers = _frame_buffers(per_chunk, params.steps + 1, *mask.shape)
    pending = None
    with ThreadPoolExecutor(1, thread_name_prefix="smoe-write") as writer:
        for index, first in enumerate(range(0, plan.runs, per_chunk)):
            last = min(first + per_chunk, plan.runs)
            chunk_plan = plan.select(first, last)
            frames = buffers[index % 2][: last - first]
            simulate(initial_fields(mask, params, chunk_plan), mask, params, chunk_plan, out=frames)
            if pending is not None:
                pending.result()  # the other buffer's chunk is written: it may be refilled
            region = slice(start + first, start + last)
            pending = writer.submit(field.__setitem__, region, frames)
        pending.result()
    return plan.runs


def heat_dataset(
    mask: np.ndarray, params: HeatParams, plan: RunPlan, runs_per_chunk: int, attrs: dict
) -> xr.Dataset:
    """The split's Dataset; ``u`` is a lazy placeholder whose chunks the tasks fill."""
    height, width = mask.shape
    frames = params.steps + 1
    field = da.empty(
        (plan.runs, frames, height, width),
        dtype=np.float32,
        chunks=(runs_per_chunk, frames, height, width),
    )
    types = params.types
    coords = {
        "run": ("run", np.arange(plan.runs), {"long_name": "run index within the split"}),
        "time": ("time", np.arange(frames), {"long_name": "time step", "units": "1"}),
        "y": ("y", np.arange(height), {"long_name": "grid row", "units": "1"}),
        "x": ("x", np.arange(width), {"long_name": "grid column", "units": "1"}),
        "region": ("region", np.arange(types), {"long_name": "region type"}),
    }
    unused = "-1 marks unused source slots"
    data_vars = {
        "u": (
            ("run", "time", "y", "x"),
            field,
            {"long_name": "temperature (dimensionless heat field)", "units": "1"},
        ),
        "mask": mask_dataset(mask)["mask"],
        "diffusivity": (
            ("region",),
            np.asarray(params.diffusivity, dtype=np.float64),
            {"long_name": "diffusion number a = kappa dt / dx^2 per region type", "units": "1"},
        ),
        "n_sources": (
            ("run",),
            plan.n_sources.astype(np.int8),
            {"long_name": "heat sources per region type", "units": "1"},
        ),
        "source_y": (
            ("run", "region", "source"),
            plan.source_cells[..., 0].astype(np.int16),
            {"long_name": "row of each initial heat source", "comment": unused},
        ),
        "source_x": (
            ("run", "region", "source"),
            plan.source_cells[..., 1].astype(np.int16),
            {"long_name": "column of each initial heat source", "comment": unused},
        ),
        "source_value": (
            ("run", "region", "source"),
            plan.source_values.astype(np.float32),
            {
                "long_name": "value set at each heat source",
                "units": "1",
                "comment": "0 marks unused source slots",
            },
        ),
        "seed": (
            ("run",),
            np.full(plan.runs, plan.seed, dtype=np.int64),
            {
                "long_name": "seed of the random stream the run was drawn from (shared "
                "by the split's runs, drawn in run order)"
            },
        ),
    }
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def store_attrs(params: HeatParams, split: str, seed: int, runs: int, mask_source: str) -> dict:
    """Global attributes: CF basics plus every generator parameter, flat and as JSON."""
    generator = {
        "split": split,
        "seed": seed,
        "runs": runs,
        "mask_source": mask_source,
        **json.loads(params.to_json()),
    }
    return {
        "title": f"location-dependent heat diffusion, {split} split",
        "Conventions": "CF-1.10",
        "source": f"smoe {__version__} (smoe simulate)",
        "history": "smoe simulate",
        "split": split,
        "seed": seed,
        "runs": runs,
        "max_sources": MAX_SOURCES,
        "mask_source": mask_source,
        **params.to_attrs(),
        "generator_json": json.dumps(generator, sort_keys=True),
    }


def simulate_split(
    mask: np.ndarray,
    params: HeatParams,
    seed: int,
    runs: int,
    out: str | Path,
    split: str = "train",
    mask_source: str = "",
    runs_per_chunk: int | None = None,
    compression: str = "lz4",
    scheduler: str = "threads",
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Simulate one split and write it as a zarr store at ``out`` (atomically).

    An existing store at ``out`` is replaced only with ``overwrite``; anything else there
    (a file, a folder that is not a zarr store) is refused, with or without it, before any
    work: a user's file is never moved aside or deleted.
    """
    params.validate()
    mask = check_mask(mask, params.types, mask_source or "mask")
    if runs < 1:
        raise InputError(f"runs must be at least 1, got {runs}")
    if workers < 1:
        raise InputError(f"workers must be at least 1, got {workers}")
    if runs_per_chunk is not None and runs_per_chunk < 1:
        raise InputError(f"runs_per_chunk must be at least 1, got {runs_per_chunk}")
    codecs = compressors(compression)
    try:
        scheduler_address(scheduler)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    out = Path(out)
    if out.suffix != ".zarr":
        raise InputError(f"output {str(out)!r}: a store's name must end in .zarr")
    check_store_output(out, overwrite)

    plan = plan_runs(mask, params, seed, runs)
    per_chunk = min(runs_per_chunk or chunk_runs(params.steps, *mask.shape), runs)
    per_task = task_runs(runs, per_chunk, workers)
    ds = heat_dataset(
        mask, params, plan, per_chunk, store_attrs(params, split, seed, runs, mask_source)
    )
    encoding = {"u": {"chunks": ds["u"].data.chunksize, "compressors": codecs}}
    # A running scheduler is reached (or refused) before anything is written.
    with dask_client(scheduler, workers) as client, atomic_directory(out) as partial:
        # Metadata and the small variables now; the field's chunks by the tasks below.
        ds.to_zarr(
            partial, mode="w-", zarr_format=3, consolidated=False, encoding=encoding, compute=False
        )
        # Absolute: a remote worker's working directory is not ours.
        field_path = str((partial / "u").absolute())
        if client is not None and scheduler_address(scheduler) is not None:
            check_workers_see(client, field_path, scheduler)
        tasks = [
            dask.delayed(simulate_into_store, pure=True, traverse=False)(
                mask, params, plan.select(start, min(start + per_task, runs)), field_path, start
            )
            for start in range(0, runs, per_task)
        ]
        run_dask(tasks, scheduler, workers, progress, f"simulate {split}", client=client)
        finish_store(partial)
    return out


CONNECT_TIMEOUT = 10.0
"""Seconds to reach a running dask scheduler (``compute.scheduler: tcp://...``) before the
job fails; reaching it is checked when the job starts, the config only checks the syntax."""


def _log(message: str) -> None:
    """A line for the job log (stderr; the workflow sends it to the rule's log file)."""
    print(message, file=sys.stderr, flush=True)


def _scheduler_error(address: str, reason: str) -> InputError:
    return InputError(
        f"cannot use the dask scheduler {address} (config key 'compute.scheduler', option "
        f"--scheduler): {reason}; start one there (dask scheduler, or dask-jobqueue's "
        "SLURMCluster) and check the host and port, or set compute.scheduler to threads"
    )


async def _identify(address: str, timeout: float) -> dict:
    """The ``identity`` a dask scheduler at ``address`` answers with."""
    from distributed.comm import connect

    comm = await connect(address, timeout=timeout)
    try:
        await comm.write({"op": "identity", "reply": True})
        return await comm.read()
    finally:
        await comm.close()


def connect_scheduler(address: str, timeout: float = CONNECT_TIMEOUT):
    """A ``distributed.Client`` of the running scheduler at ``address`` (tcp://HOST:PORT),
    after logging its address, workers and dashboard; an InputError naming the config key
    and the address when it cannot be reached within ``timeout`` seconds."""
    from distributed import Client

    host, port = scheduler_address(address) or ("", 0)
    # A plain TCP connection first: nothing listening fails at once with the system's
    # reason, instead of after the client's retries.
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or one_line(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {timeout:g} s"
        raise _scheduler_error(address, f"cannot connect ({reason})") from None
    # Then dask's handshake, bounded: the client's own timeout does not cover a server that
    # accepts the connection and never answers (something else listening on that port).
    try:
        identity = asyncio.run(asyncio.wait_for(_identify(address, timeout), timeout))
    except (OSError, TimeoutError) as exc:
        reason = one_line(exc) or type(exc).__name__
        raise _scheduler_error(
            address, f"no dask scheduler answered within {timeout:g} s ({reason})"
        ) from None
    if not isinstance(identity, dict) or identity.get("type") != "Scheduler":
        raise _scheduler_error(address, "what answers there is not a dask scheduler")
    try:
        client = Client(address, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise _scheduler_error(
            address, f"no dask scheduler answered within {timeout:g} s ({one_line(exc)})"
        ) from None
    info = client.scheduler_info()
    workers = info.get("workers", {})
    threads = sum(worker.get("nthreads", 0) for worker in workers.values())
    if "dashboard" in info.get("services", {}):
        dashboard = client.dashboard_link
    else:
        dashboard = "none (install bokeh>=3.1 where the scheduler runs to get one)"
    _log(
        f"dask scheduler {info.get('address', address)}: {len(workers)} worker(s), "
        f"{threads} thread(s); dashboard {dashboard}"
    )
    if not workers:
        _log("the scheduler has no workers yet: the tasks wait until workers connect")
    return client


def check_workers_see(client, path: str, address: str) -> None:
    """Refuse a cluster whose workers cannot open the store being written (it must be on a
    file system they share with this job) or cannot import smoe."""

    def probe(path: str = path) -> str:
        import importlib.util
        import os

        if importlib.util.find_spec("smoe") is None:
            return "smoe is not installed in its Python environment"
        if not os.path.isdir(path):
            return f"it cannot see {path!r} (results must be on a file system the workers share)"
        return ""

    problems = {worker: text for worker, text in client.run(probe).items() if text}
    if problems:
        worker, text = next(iter(sorted(problems.items())))
        more = f" (and {len(problems) - 1} more worker(s))" if len(problems) > 1 else ""
        raise _scheduler_error(address, f"worker {worker}: {text}{more}")


@contextmanager
def dask_client(scheduler: str, workers: int) -> Iterator:
    """The ``distributed.Client`` a scheduler needs, closed at the end (a cluster of our own
    too, a running scheduler and its workers never), or None for dask's local schedulers."""
    if scheduler == "distributed":
        from distributed import Client, LocalCluster

        with (
            LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            yield client
    elif scheduler_address(scheduler) is not None:
        client = connect_scheduler(scheduler)
        try:
            yield client
        finally:
            client.close()
    else:
        yield None


def run_dask(work, scheduler: str, workers: int, progress: bool, description: str, client=None):
    """Compute a dask collection on the chosen scheduler (with ``client`` when given, as
    :func:`dask_client` makes it), with a progress bar if asked; returns its value."""
    if client is None and (scheduler == "distributed" or scheduler_address(scheduler)):
        with dask_client(scheduler, workers) as own:
            return run_dask(work, scheduler, workers, progress, description, client=own)
    if client is not None:
        from distributed import progress as show_progress

        futures = client.compute(work)
        if progress:
            show_progress(futures, interval="1s")
        return client.gather(futures)
    if progress:
        from tqdm.dask import TqdmCallback

        with TqdmCallback(desc=description, mininterval=1.0):
            return dask.compute(work, scheduler=scheduler, num_workers=workers)[0]
    return dask.compute(work, scheduler=scheduler, num_workers=workers)[0]


class WorkflowStore(WrapperStore):
    """A store as an earlier version of the workflow left it, Snakemake's timestamp file at
    its top (the rules declared the folder, not its root metadata): that file is left out of
    the listings, and nothing else (zarr still reports any other foreign file)."""

    async def list(self):
        async for key in self._store.list():
            if key != SNAKEMAKE_TIMESTAMP:
                yield key

    async def list_prefix(self, prefix: str):
        async for key in self._store.list_prefix(prefix):
            if key != SNAKEMAKE_TIMESTAMP:
                yield key

    async def list_dir(self, prefix: str):
        async for key in self._store.list_dir(prefix):
            if prefix or key != SNAKEMAKE_TIMESTAMP:
                yield key


FIELD = "u"
REQUIRED_VARIABLES = (FIELD, "mask", "diffusivity")
"""Arrays every store must hold: a store without one cannot be trained or evaluated on."""


def regenerate_hint(path: str | Path) -> str:
    """How to rebuild a damaged store."""
    return (
        f"regenerate the store: rm -r {path} then rerun snakemake, or rerun "
        f"smoe simulate ... --out {path} --overwrite"
    )


def _check_metadata(path: Path) -> None:
    """Every array's metadata readable and the required arrays present, read as plain JSON.

    Checked before zarr is asked to open the store: zarr reads the metadata concurrently
    and a garbled file aborts it with a bare parser message (and unfinished tasks), which
    names neither the store nor the file.
    """
    name = repr(str(path))
    hint = regenerate_hint(path)
    if not is_zarr_store(path):
        raise InputError(
            f"store {name} is not a readable zarr store: its metadata zarr.json is missing, "
            f"garbled or not a group's; {hint}"
        )
    for child in sorted(p for p in path.iterdir() if p.is_dir()):
        meta_file = child / "zarr.json"
        meta = read_json_object(meta_file)
        if meta is None or meta.get("node_type") not in ("array", "group"):
            state = "missing" if not meta_file.exists() else "unreadable or garbled"
            raise InputError(
                f"store {name}: metadata {child.name}/zarr.json of array {child.name!r} is "
                f"{state}; {hint}"
            )
    for variable in REQUIRED_VARIABLES:
        if not (path / variable).is_dir():
            raise InputError(f"store {name} has no array {variable!r}; {hint}")


def _open_arrays(path: Path) -> dict:
    """Each array of the store opened on its own, so that bad metadata is named by file."""
    import zarr

    arrays = {}
    for child in sorted(p for p in path.iterdir() if p.is_dir()):
        try:
            node = zarr.open(child, mode="r")
        except Exception as exc:  # noqa: BLE001 - zarr raises many types for bad metadata
            raise InputError(
                f"store {str(path)!r}: metadata {child.name}/zarr.json cannot be used "
                f"({type(exc).__name__}: {one_line(exc)}); {regenerate_hint(path)}"
            ) from exc
        arrays[child.name] = node
    return arrays


def chunk_key(array, index: int) -> str:
    """The store key of the field's chunk holding run ``index``, e.g. ``u/c/3/0/0/0``."""
    coords = (index // int(array.chunks[0]),) + (0,) * (len(array.shape) - 1)
    return f"{FIELD}/{array.metadata.encode_chunk_key(coords)}"


def _chunk_keys(name: str, array) -> list[str]:
    """Every chunk key of an array, e.g. ``u/c/0/0/0/0``, in C order."""
    import itertools

    grid = [math.ceil(n / c) for n, c in zip(array.shape, array.chunks, strict=True)]
    return [
        f"{name}/{array.metadata.encode_chunk_key(coords)}"
        for coords in itertools.product(*(range(n) for n in grid))
    ]


def _check_chunks(path: Path, name: str, array) -> None:
    """Every chunk of an array present: zarr would silently read a missing one as the fill
    value (NaN for the field and the diffusivities, 0 for the region map)."""
    missing = [key for key in _chunk_keys(name, array) if not (path / key).is_file()]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        shown = ", ".join(missing[:5]) + more
        what = "the field" if name == FIELD else f"array {name!r}"
        raise InputError(
            f"store {str(path)!r}: chunk {shown} of {what} is missing; {regenerate_hint(path)}"
        )


def chunk_read_error(path: str | Path, key: str, exc: BaseException) -> InputError:
    """The error for a field chunk that cannot be read or decoded."""
    if isinstance(exc, PermissionError):
        return InputError(
            f"store {str(path)!r}: chunk {key} cannot be read: permission denied; give this "
            f"user read access to {str(Path(path) / key)!r}, or {regenerate_hint(path)}"
        )
    reason = one_line(exc) or type(exc).__name__
    return InputError(
        f"store {str(path)!r}: chunk {key} cannot be read ({type(exc).__name__}: {reason}); it "
        f"is truncated or damaged: {regenerate_hint(path)}"
    )


def bad_field_chunks(path: str | Path) -> list[tuple[str, BaseException]]:
    """Read every chunk of the field on its own; the keys (and errors) of those that fail."""
    import zarr

    path = Path(path)
    array = zarr.open_array(path / FIELD, mode="r")
    step = int(array.chunks[0])
    bad = []
    for first in range(0, int(array.shape[0]), step):
        try:
            array[first : first + step]
        except Exception as exc:  # noqa: BLE001 - any decoder's error means a damaged chunk
            bad.append((chunk_key(array, first), exc))
    return bad


@contextmanager
def field_reads(path: str | Path) -> Iterator[None]:
    """Turn a failed read of the field (dask, xarray) into an InputError naming the chunk.

    The failing chunk is found by reading each chunk on its own, so only a failure pays
    for the search; a failure that no chunk explains is raised unchanged.
    """
    try:
        yield
    except InputError:
        raise
    except Exception as exc:
        try:
            bad = bad_field_chunks(path)
        except Exception:  # noqa: BLE001 - the search is best effort; report the original
            bad = []
        if not bad:
            raise
        key, cause = bad[0]
        error = chunk_read_error(path, key, cause)
        if len(bad) > 1:
            error = InputError(f"{error} ({len(bad) - 1} more damaged chunk(s))")
        raise error from exc


def open_store(path: str | Path) -> xr.Dataset:
    """Open a finished store lazily, with a clear error when it is missing, unfinished or
    damaged (garbled or missing metadata, a missing chunk of the field)."""
    path = Path(path)
    check_store_folder(path, STORE_REDO)
    _check_metadata(path)
    arrays = _open_arrays(path)
    try:
        field = arrays[FIELD]
        if field.ndim != 4:
            raise InputError(
                f"store {str(path)!r}: field u has {field.ndim} dimensions, expected 4 "
                f"(run, time, y, x); {regenerate_hint(path)}"
            )
        _check_chunks(path, FIELD, field)
        diffusivity = arrays["diffusivity"]
        _check_chunks(path, "diffusivity", diffusivity)
        if diffusivity.shape[0] > 1:
            # A map of one region type is all zeros, the fill value: zarr does not write it.
            _check_chunks(path, "mask", arrays["mask"])
        store = WorkflowStore(LocalStore(path, read_only=True))
        ds = xr.open_zarr(store, consolidated=False)
        ds.attrs.pop(CHUNK_SUMS, None)  # the files' record, not the data's: exports omit it
        return ds
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - zarr and xarray raise many types for bad stores
        raise InputError(
            f"store {str(path)!r} is not a readable zarr store ({type(exc).__name__}: "
            f"{one_line(exc)}); {regenerate_hint(path)}"
        ) from exc


def non_finite_message(path: str | Path, bad: dict[int, int]) -> str:
    runs = ", ".join(f"run {run}: {count}" for run, count in list(bad.items())[:10])
    more = f" and {len(bad) - 10} more runs" if len(bad) > 10 else ""
    return (
        f"store {str(path)!r}: field u has {sum(bad.values())} non-finite value(s) (NaN/Inf) "
        f"({runs}{more}); {regenerate_hint(path)}"
    )


def export_netcdf(
    store: str | Path, out: str | Path, progress: bool = True, workers: int = 1
) -> Path:
    """Write a store as a compressed netCDF4 file for tools that do not read zarr.

    A field with NaN or infinite values is refused (naming the runs), as training and
    evaluation refuse it; the check shares the export's single pass over the data and the
    output is only renamed into place when both succeed.
    """
    out = Path(out)
    if out.suffix != ".nc":
        raise InputError(f"output {str(out)!r}: a netCDF file's name must end in .nc")
    ds = open_store(store)
    encoding = {}
    for name, var in ds.data_vars.items():
        enc = {"zlib": True, "complevel": 1, "shuffle": True}
        if var.ndim == 4:
            enc["chunksizes"] = (1, *var.shape[1:])
        encoding[name] = enc
    field = ds[FIELD].data
    counts = (~da.isfinite(field)).sum(axis=tuple(range(1, field.ndim)))
    with atomic_file(out) as partial, field_reads(store):
        write = ds.to_netcdf(
            partial, engine="netcdf4", format="NETCDF4", encoding=encoding, compute=False
        )
        _, counts = run_dask(
            (write, counts), "threads", workers, progress, f"export {Path(store).name}"
        )
        bad = {int(run): int(n) for run, n in enumerate(np.asarray(counts)) if n}
        if bad:
            raise InputError(non_finite_message(store, bad) + "; nothing was written")
    return out
