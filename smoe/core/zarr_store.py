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


def is_zarr_store(path: str | Path) -> bool:
    """Whether ``path`` is a folder whose top-level ``zarr.json`` describes a zarr group."""
    meta = read_json_object(Path(path) / "zarr.json") if Path(path).is_dir() else None
    return meta is not None and meta.get("node_type") == "group"


def check_store_output(out: str | Path, overwrite: bool) -> None:
    """Refuse an output path holding anything but a store, or a store without ``overwrite``."""
    out = Path(out)
    name = repr(str(out))
    if not (out.exists() or out.is_symlink()):
        return
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
