"""What a store was made from, as plain data, and a short fingerprint of it.

A result computed from a store (a checkpoint, a metric) is only reused while the store it
came from is the same. Every store records how it was made in its attributes (every
generator parameter as ``generator_json``); together with the region map and the
diffusivities it actually holds and the shape of its field, that identifies the data
without reading the field itself, which for the paper's train split is 1.65 GB.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import xarray as xr


def store_provenance(ds: xr.Dataset) -> dict[str, Any]:
    """The generator parameters, split, seed and run count of an open store, its field's
    shape, and digests of the region map and diffusivities it holds."""
    generator = ds.attrs.get("generator_json")
    return {
        "generator": json.loads(generator) if isinstance(generator, str) else None,
        "shape": [int(n) for n in ds["u"].shape],
        "mask_sha256": array_digest(ds["mask"].values.astype(np.int64)),
        "diffusivity": [float(a) for a in ds["diffusivity"].values],
    }


def store_inconsistencies(ds: xr.Dataset) -> list[str]:
    """Where an open store disagrees with its own record of how it was made.

    The generator parameters in ``generator_json`` are written with the data; a diffusivity
    variable, a region map or a field shape that no longer matches them means the store was
    edited or assembled after it was written, and nothing computed from it can be trusted.
    """
    problems = []
    generator = ds.attrs.get("generator_json")
    if not isinstance(generator, str):
        return ["it has no generator record (attribute generator_json)"]
    record = json.loads(generator)
    held = [float(a) for a in ds["diffusivity"].values]
    recorded = [float(a) for a in record.get("diffusivity", [])]
    if held != recorded:
        problems.append(f"its diffusivity variable {held} differs from its record {recorded}")
    runs, frames = int(ds["u"].shape[0]), int(ds["u"].shape[1])
    if record.get("runs") is not None and runs != record["runs"]:
        problems.append(f"it holds {runs} runs but records {record['runs']}")
    if record.get("steps") is not None and frames != record["steps"] + 1:
        problems.append(f"it holds {frames} frames per run but records {record['steps']} steps")
    types = int(ds["mask"].max()) + 1 if ds["mask"].size else 0
    if types > len(recorded):
        problems.append(f"its region map has {types} types but it records {len(recorded)}")
    return problems


def array_digest(values: np.ndarray) -> str:
    """SHA-256 of an array's shape, dtype and bytes."""
    values = np.ascontiguousarray(values)
    digest = hashlib.sha256(f"{values.shape}{values.dtype}".encode())
    digest.update(values.tobytes())
    return digest.hexdigest()


def fingerprint(record: Any) -> str:
    """A short, stable digest of any JSON-able record (keys sorted)."""
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """The first differing field of two records, as ``key: old -> new`` (for log lines)."""
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            return describe_difference(before, after, f"{prefix}{key}.")
        return f"{prefix}{key}: {_short(before)} -> {_short(after)}"
    return "no difference"


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
