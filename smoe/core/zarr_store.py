"""Zarr stores as every family writes and opens them: what a finished store looks like,
and the refusals (naming the path) before a job writes over or reads from the wrong thing."""

from __future__ import annotations

import json
from pathlib import Path

from smoe.core.errors import InputError


def read_json_object(path: Path) -> dict | None:
    """A JSON object from ``path``, or None when the file is missing, unreadable or garbled."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


STORE_HEAD = "zarr.json"
"""A store's root metadata: the file a rule declares as its output, so that Snakemake
writes no timestamp file into the store (it marks a directory output with one)."""


def store_argument(value: str) -> Path:
    """A store named on the command line: its folder, or its root ``zarr.json`` (the file
    the workflow's rules declare for a store, so a rule passes its input or output as is)."""
    path = Path(value)
    return path.parent if path.name == STORE_HEAD else path


SNAKEMAKE_TIMESTAMP = ".snakemake_timestamp"
"""What Snakemake leaves at the top of a directory output (stores written before the rules
declared the root metadata hold one)."""


def consolidate(path: str | Path) -> None:
    """Copy every array's metadata into the root ``zarr.json``, so that
    ``xarray.open_zarr(path)`` reads one file and warns about nothing.

    zarr warns on writing that consolidated metadata is not yet in the v3 specification;
    zarr-python and xarray read it, other readers ignore it (each array keeps its own
    metadata), so the warning is silenced here and nowhere else.
    """
    import warnings

    import zarr

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Consolidated metadata is currently not part", category=UserWarning
        )
        zarr.consolidate_metadata(str(path), zarr_format=3)


def finish_store(path: str | Path) -> None:
    """The last step of every store writer: record each chunk file's size and CRC-32 in the
    root attributes (:mod:`smoe.core.chunk_sums`, so damage to a chunk is seen before a job
    reads it), then :func:`consolidate` the metadata."""
    from smoe.core.chunk_sums import record_chunk_sums

    record_chunk_sums(path)
    consolidate(path)


def is_zarr_store(path: str | Path) -> bool:
    """Whether ``path`` is a folder whose top-level ``zarr.json`` describes a zarr group."""
    meta = read_json_object(Path(path) / "zarr.json") if Path(path).is_dir() else None
    return meta is not None and meta.get("node_type") == "group"


def is_headless_store(path: Path) -> bool:
    """A store whose root ``zarr.json`` is gone but whose arrays remain: what Snakemake
    leaves when it removes the declared output before rebuilding the store."""
    entries = list(path.iterdir())
    arrays = [e for e in entries if e.is_dir() and (e / STORE_HEAD).is_file()]
    others = [e for e in entries if e.name != SNAKEMAKE_TIMESTAMP and e not in arrays]
    return bool(arrays) and not others and not (path / STORE_HEAD).exists()


def check_store_output(out: str | Path, overwrite: bool) -> None:
    """Refuse an output path holding anything but a store, or a store without ``overwrite``.

    An empty folder is taken (Snakemake makes the folder of a declared ``zarr.json`` before
    the job), and with ``overwrite`` a store without its root metadata (Snakemake removed
    it before the rebuild): neither holds anything a user could lose.
    """
    out = Path(out)
    name = repr(str(out))
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    if out.is_dir() and is_headless_store(out):
        if overwrite:
            return
        raise InputError(
            f"output {name} is a store without its root metadata {STORE_HEAD} (as Snakemake "
            "leaves a store it is about to rebuild); nothing was changed: pass --overwrite to "
            f"replace it, or remove it first (rm -r {out})"
        )
    if not out.is_dir():
        raise InputError(
            f"output {name} exists and is a file, not a zarr store; nothing was changed: "
            "remove it or choose another --out"
        )
    if not is_zarr_store(out):
        raise InputError(
            f"output {name} exists and is not a zarr store (no readable zarr.json of a group); "
            "nothing was changed: remove it or choose another --out"
        )
    if not overwrite:
        raise InputError(
            f"store {name} already exists; nothing was changed: pass --overwrite to replace "
            f"it, or remove it first (rm -r {out})"
        )


def check_store_folder(path: Path, redo: str) -> None:
    """Refuse, naming it, a store path that does not exist (saying so when an unfinished
    ``.partial`` store lies beside it, and ``redo`` what makes it) or that is a file."""
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        beside = f" (an unfinished .partial store is beside it: {redo})" if partial.exists() else ""
        raise InputError(f"store {str(path)!r} does not exist{beside}")
    if not path.is_dir():
        raise InputError(f"store {str(path)!r} is a file, not a zarr store (a folder)")
