"""A zarr v3 store checked from its files alone, without importing zarr, before a job reads it.

What zarr itself would trip over inside the job, after Snakemake has deleted that job's old
outputs: metadata that is missing or garbled, an array the root metadata lists but the store
lacks, a chunk that is missing or cut short. Reading the metadata gives each array's shape,
chunk grid, data type, codecs and fill value, hence every chunk's key and what its size can
be: exact for an uncompressed chunk, and for blosc, gzip and zstd the size their own headers
and trailers declare. A chunk file zarr does not write (all of it the fill value) may be
missing, unless the fill value is one the workflow's data never hold (NaN, infinities).
Stores that record their chunks' sums (:mod:`smoe.core.chunk_sums`) are compared with that
record instead, which also sees damaged bytes of the right size.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from smoe.core.chunk_sums import recorded_sums, sum_problems
from smoe.core.zarr_store import STORE_HEAD, read_json_object

ITEM_SIZES = {
    "bool": 1,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "uint16": 2,
    "float16": 2,
    "int32": 4,
    "uint32": 4,
    "float32": 4,
    "int64": 8,
    "uint64": 8,
    "float64": 8,
    "complex64": 8,
    "complex128": 16,
}
"""Bytes per value of zarr v3's fixed-size data types (others: no size check)."""

NEVER_DATA = ("NaN", "Infinity", "-Infinity")
"""Fill values the workflow's stores never hold as data: a chunk of such an array that is
missing was not skipped by zarr as all fill value, it was lost."""

SHOWN = 3
"""Problems named per store; the rest are counted."""


def store_problems(store: str | Path) -> list[str]:
    """What is wrong with the store at ``store``, one phrase each (empty: it looks whole)."""
    store = Path(store)
    root = read_json_object(store / STORE_HEAD)
    if root is None or root.get("node_type") != "group":
        state = "missing" if not (store / STORE_HEAD).exists() else "garbled or not a group's"
        return [f"its root metadata {STORE_HEAD} is {state}"]
    problems, arrays = _metadata(store, root)
    recorded = recorded_sums(root)
    if recorded is not None:
        return problems + sum_problems(store, recorded)
    for name, meta in arrays.items():
        problems += _chunk_problems(store, name, meta)
    return problems


def summary(problems: list[str]) -> str:
    """The first few problems on one line, and how many more there are."""
    more = len(problems) - SHOWN
    return "; ".join(problems[:SHOWN]) + (f" (and {more} more)" if more > 0 else "")


def _metadata(store: Path, root: dict) -> tuple[list[str], dict[str, dict]]:
    """Every array's metadata (each folder's ``zarr.json`` and each array the consolidated
    metadata lists), and the problems with it."""
    listed = ((root.get("consolidated_metadata") or {}).get("metadata")) or {}
    names = set(listed) | {p.name for p in store.iterdir() if (p / STORE_HEAD).exists()}
    problems, arrays = [], {}
    for name in sorted(names):
        meta_file = store / name / STORE_HEAD
        meta = read_json_object(meta_file)
        if meta is None:
            state = "missing" if not meta_file.exists() else "garbled"
            problems.append(f"metadata {name}/{STORE_HEAD} is {state}")
        elif meta.get("node_type") == "group":
            problems += [f"{name}/{p}" for p in store_problems(store / name)]
        elif meta.get("node_type") != "array" or _layout(meta) is None:
            problems.append(f"metadata {name}/{STORE_HEAD} is not a zarr v3 array's")
        else:
            arrays[name] = meta
    return problems, arrays


def _layout(meta: dict) -> tuple[list[int], list[int]] | None:
    """An array's shape and chunk shape, or None when its metadata lacks them."""
    shape = meta.get("shape")
    grid = meta.get("chunk_grid") or {}
    chunks = (grid.get("configuration") or {}).get("chunk_shape")
    if grid.get("name") != "regular" or not isinstance(shape, list):
        return None
    if not isinstance(chunks, list) or len(chunks) != len(shape):
        return None
    if not all(isinstance(n, int) and n >= 0 for n in shape + chunks) or 0 in chunks:
        return None
    return shape, chunks


def _chunk_keys(meta: dict) -> list[str]:
    """Every chunk key of an array, as its chunk key encoding writes it."""
    shape, chunks = _layout(meta)
    encoding = meta.get("chunk_key_encoding") or {}
    v2 = encoding.get("name") == "v2"
    separator = (encoding.get("configuration") or {}).get("separator", "." if v2 else "/")
    grid = [range(math.ceil(n / c)) for n, c in zip(shape, chunks, strict=True)]
    keys = []
    for coords in itertools.product(*grid):
        parts = [str(c) for c in coords]
        if v2:
            keys.append(separator.join(parts) or "0")
        else:
            keys.append(separator.join(["c", *parts]))
    return keys


def _chunk_problems(store: Path, name: str, meta: dict) -> list[str]:
    """Missing chunks that cannot be the fill value, and sizes no chunk can have."""
    _, chunks = _layout(meta)
    item = ITEM_SIZES.get(meta.get("data_type"))
    nbytes = math.prod(chunks) * item if item else None
    may_skip = str(meta.get("fill_value")) not in NEVER_DATA
    codecs = [c.get("name") for c in meta.get("codecs") or [] if isinstance(c, dict)]
    problems = []
    for key in _chunk_keys(meta):
        path = store / name / key
        if not path.is_file():
            if not may_skip:
                problems.append(f"chunk {name}/{key} is missing")
            continue
        problem = _size_problem(path, codecs, nbytes)
        if problem:
            problems.append(f"chunk {name}/{key} {problem}")
    return problems


def _size_problem(path: Path, codecs: list[str], nbytes: int | None) -> str | None:
    """Why a chunk file cannot be what its codecs make of ``nbytes`` bytes of values (None:
    plausible). ``codecs``: the array's codec names, in the order they encode."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    if "bytes" not in codecs or nbytes is None:
        return None  # sharded or variable-size values: the size says little
    outer = codecs[codecs.index("bytes") + 1 :]
    inner = nbytes if len(outer) == 1 else None  # the size the outermost codec compressed
    if not outer or outer == ["crc32c"]:
        expected = nbytes + 4 * len(outer)
        return None if size == expected else f"is {size} bytes, but it holds {expected}"
    with open(path, "rb") as handle:
        if outer[-1] == "blosc":
            return _blosc_problem(handle.read(16), size, inner)
        if outer[-1] == "gzip":
            return _gzip_problem(handle, size, inner)
        if outer[-1] == "zstd":
            return _zstd_problem(handle, size)
    return None


def _blosc_problem(header: bytes, size: int, inner: int | None) -> str | None:
    """A blosc header states the compressed size (bytes 12-16) and the original one (4-8)."""
    if len(header) < 16:
        return f"is {size} bytes, shorter than a blosc header"
    declared = int.from_bytes(header[12:16], "little")
    if declared != size:
        return f"is {size} bytes, but its blosc header says {declared}"
    original = int.from_bytes(header[4:8], "little")
    if inner is not None and original != inner:
        return f"decompresses to {original} bytes by its blosc header, but it holds {inner}"
    return None


def _gzip_problem(handle, size: int, inner: int | None) -> str | None:
    """A gzip member starts with 1f 8b and ends with the original size modulo 2**32."""
    if size < 18 or handle.read(2) != b"\x1f\x8b":
        return "is not gzip data"
    handle.seek(size - 4)
    original = int.from_bytes(handle.read(4), "little")
    if inner is not None and original != inner % 2**32:
        return f"is truncated or damaged: its gzip trailer says {original} bytes, not {inner}"
    return None


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _zstd_problem(handle, size: int) -> str | None:
    """A zstd frame's length, walked from its header through each block's header."""
    head = handle.read(6)
    if len(head) < 5 or head[:4] != ZSTD_MAGIC:
        return "is not zstd data"
    descriptor = head[4]
    single = (descriptor >> 5) & 1
    content_size = (descriptor >> 6) & 3
    dictionary = descriptor & 3
    position = 5 + (0 if single else 1) + (0, 1, 2, 4)[dictionary]
    position += (1 if single else 0, 2, 4, 8)[content_size]
    while True:
        handle.seek(position)
        block = handle.read(3)
        if len(block) < 3:
            return f"is truncated: {size} bytes end inside its zstd frame"
        value = int.from_bytes(block, "little")
        kind, length = (value >> 1) & 3, value >> 3
        if kind == 3:
            return "is damaged: a zstd block header is invalid"
        position += 3 + (1 if kind == 1 else length)
        if value & 1:
            break
    position += 4 if (descriptor >> 2) & 1 else 0
    if position != size:
        return f"is {size} bytes, but its zstd frame is {position}"
    return None
