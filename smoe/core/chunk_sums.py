"""Each stored chunk's size and CRC-32, recorded when a store is written and compared before a
job reads it.

A chunk whose bytes were damaged after it was written (a bad disk block, a copy cut short
and padded, a stray write) keeps its size, so no look at the store's layout can see it;
only its bytes can. The writer records the size and ``zlib.crc32`` of every chunk file in
the root ``zarr.json`` attributes (:data:`CHUNK_SUMS`, before the metadata is consolidated,
so zarr and xarray read the store as before), and the workflow's planning check compares
them: a stat per chunk, then one pass over the bytes at the speed of CRC-32, far below
what the job reading the store then spends on the same bytes. Stores written before the
record existed have none; their chunks get the layout checks only.
"""

from __future__ import annotations

import zlib
from pathlib import Path

CHUNK_SUMS = "smoe_chunk_sums"
"""The root attribute holding ``{"algorithm": "crc32", "files": {key: [size, crc]}}``."""

ALGORITHM = "crc32"

_BLOCK = 1 << 22
_NOT_CHUNKS = ("zarr.json", ".snakemake_timestamp")


def file_crc32(path: Path) -> int:
    """The CRC-32 of a file's bytes, read in blocks (a chunk may be many MiB)."""
    crc = 0
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def chunk_files(store: Path) -> list[str]:
    """The keys of every file in ``store`` but the metadata (``zarr.json``), sorted."""
    return sorted(
        path.relative_to(store).as_posix()
        for path in store.rglob("*")
        if path.is_file() and path.name not in _NOT_CHUNKS
    )


def chunk_sums(store: str | Path) -> dict:
    """The record of ``store``'s chunk files as they are now (what :data:`CHUNK_SUMS` holds)."""
    store = Path(store)
    files = {
        key: [(store / key).stat().st_size, file_crc32(store / key)] for key in chunk_files(store)
    }
    return {"algorithm": ALGORITHM, "files": files}


def record_chunk_sums(store: str | Path) -> None:
    """Write the record of the finished chunks into the root attributes of ``store``."""
    import zarr

    group = zarr.open_group(str(store), mode="r+", zarr_format=3)
    group.attrs[CHUNK_SUMS] = chunk_sums(store)


def without_chunk_sums(attrs: dict) -> dict:
    """A store's attributes without the record: they describe the data, the record only the
    files (and a netCDF export could not hold it)."""
    return {key: value for key, value in attrs.items() if key != CHUNK_SUMS}


def recorded_sums(root_meta: dict) -> dict[str, list[int]] | None:
    """The recorded ``key -> [size, crc]`` of a root ``zarr.json`` (parsed), or None when the
    store has no record (written before it existed) or one this version does not know."""
    record = (root_meta.get("attributes") or {}).get(CHUNK_SUMS)
    if not isinstance(record, dict) or record.get("algorithm") != ALGORITHM:
        return None
    files = record.get("files")
    return files if isinstance(files, dict) else None


def sum_problems(store: Path, recorded: dict[str, list[int]]) -> list[str]:
    """What differs from the record, one phrase per chunk file: missing, another size (a stat,
    checked first for every chunk), other bytes (a CRC-32 over the rest)."""
    problems, same_size = [], []
    for key, entry in sorted(recorded.items()):
        path = store / key
        if not (isinstance(entry, list) and len(entry) == 2):
            problems.append(f"the record of chunk {key} is garbled")
        elif not path.is_file():
            problems.append(f"chunk {key} is missing")
        elif path.stat().st_size != entry[0]:
            problems.append(
                f"chunk {key} is {path.stat().st_size} bytes, but {entry[0]} were written"
            )
        else:
            same_size.append((key, path, entry[1]))
    for key, path, crc in same_size:
        try:
            found = file_crc32(path)
        except OSError as exc:
            problems.append(f"chunk {key} cannot be read ({exc.strerror or exc})")
            continue
        if found != crc:
            problems.append(f"chunk {key} has other bytes than were written (its CRC-32 differs)")
    return problems
