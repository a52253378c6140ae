"""Whether a workflow file is whole, judged from its bytes in a moment and without the library
that reads it (no torch, no netCDF library): checkpoints, JSON, CSV, netCDF and ``.npy``.

Each check returns None for a file that looks whole, or a phrase saying what is wrong (the
caller names the file). They see what the readers inside a job would trip over once the
job has started (and Snakemake has deleted its old outputs): a file cut short, garbled, or
of another kind.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

from smoe.core.errors import InputError, one_line

Check = Callable[[Path], "str | None"]
"""A check of one file: None when it looks whole, else what is wrong with it."""

STORAGE_BYTES = {
    "BoolStorage": 1,
    "ByteStorage": 1,
    "CharStorage": 1,
    "UntypedStorage": 1,
    "ShortStorage": 2,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "IntStorage": 4,
    "FloatStorage": 4,
    "LongStorage": 8,
    "DoubleStorage": 8,
    "ComplexFloatStorage": 8,
    "ComplexDoubleStorage": 16,
}
"""Bytes per element of the storage types ``torch.save`` names (others: no size check)."""


class _StandIn:
    """What every class or function a checkpoint's pickle names becomes: it takes any
    arguments and state and does nothing, so reading the pickle runs none of its code."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:
        pass

    def append(self, value) -> None:
        pass

    def extend(self, values) -> None:
        pass


class _StorageScan(pickle.Unpickler):
    """Reads a ``data.pkl`` to list the tensor storages it references, ``(key, bytes)``,
    importing nothing: the entries ``torch.load`` will ask the archive for."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: list[tuple[str, int | None]] = []

    def find_class(self, module: str, name: str) -> type:
        return type(name, (_StandIn,), {})

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage"):
            item = STORAGE_BYTES.get(getattr(pid[1], "__name__", ""))
            numel = pid[4] if isinstance(pid[4], int) else None
            key = pid[2].decode() if isinstance(pid[2], bytes) else str(pid[2])
            self.storages.append((key, numel * item if item and numel is not None else None))
        return _StandIn()


def require_checkpoint(path: Path) -> None:
    """Refuse, naming it, a checkpoint path that is not a file: a check a command makes
    before it imports PyTorch, so a wrong path costs a fraction of a second."""
    if not Path(path).is_file():
        raise InputError(f"checkpoint {str(path)!r} does not exist")


def checkpoint_problem(path: Path) -> str | None:
    """A ``torch.save`` archive: its zip directory readable, every entry's CRC-32 right, and
    every storage its ``data.pkl`` references present and long enough."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = {info.filename: info for info in archive.infolist()}
            pickles = [name for name in infos if name.endswith("/data.pkl")]
            if len(pickles) != 1:
                return "not a checkpoint: the zip archive holds no data.pkl as torch.save writes"
            for name in infos:
                with archive.open(name) as entry:  # zipfile checks the CRC-32 at the end
                    while entry.read(1 << 22):
                        pass
            scan = _StorageScan(archive.read(pickles[0]))
            scan.load()
    except zipfile.BadZipFile as exc:
        return f"not a readable zip archive as torch.save writes ({one_line(exc)})"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or one_line(exc)})"
    except Exception as exc:  # noqa: BLE001 - a garbled pickle raises many types
        return f"its data.pkl cannot be read ({type(exc).__name__}: {one_line(exc)})"
    prefix = pickles[0][: -len("data.pkl")]
    for key, nbytes in scan.storages:
        info = infos.get(f"{prefix}data/{key}")
        if info is None:
            return f"its tensor data {prefix}data/{key} is missing from the archive"
        if nbytes is not None and info.file_size < nbytes:
            return (
                f"its tensor data {prefix}data/{key} holds {info.file_size} bytes, "
                f"{nbytes} are needed"
            )
    return None


def json_problem(path: Path) -> str | None:
    """Parses as JSON."""
    try:
        json.loads(path.read_bytes())
    except OSError as exc:
        return f"cannot be read ({exc.strerror or one_line(exc)})"
    except ValueError as exc:
        return f"not JSON ({one_line(exc)})"
    return None


def csv_problem(path: Path) -> str | None:
    """A header, rows of as many fields, and a final newline (``csv`` and pandas end every
    row with one: a file cut inside its last row has none)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot be read as text ({one_line(exc)})"
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or not rows[0]:
        return "not a table: it has no header row"
    if not text.endswith("\n"):
        return "truncated: its last row has no line end"
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(rows[0]):
            return f"row {number} has {len(row)} fields, the header {len(rows[0])}"
    return None


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
CLASSIC_NETCDF = (b"CDF\x01", b"CDF\x02", b"CDF\x05")


def netcdf_problem(path: Path) -> str | None:
    """A netCDF file's header: classic netCDF's magic number, or netCDF-4's HDF5 superblock,
    whose end-of-file address must lie within the file (what HDF5 reports as truncated)."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    size = path.stat().st_size
    if head[:4] in CLASSIC_NETCDF:
        return None
    if head[:8] != HDF5_SIGNATURE:
        return "not a netCDF file (neither a classic header nor an HDF5 signature)"
    version = head[8]
    if version in (0, 1):
        offsets = head[13]
        at = (24 if version == 0 else 28) + 2 * offsets
    elif version in (2, 3):
        offsets = head[9]
        at = 12 + 2 * offsets
    else:
        return f"its HDF5 superblock has version {version}, which no HDF5 writes"
    if offsets not in (2, 4, 8) or len(head) < at + offsets:
        return "its HDF5 superblock is garbled"
    end = int.from_bytes(head[at : at + offsets], "little")
    if end > size:
        return f"truncated: {size} bytes, but its HDF5 superblock says {end}"
    return None


def npy_problem(path: Path) -> str | None:
    """A ``.npy`` header and as many bytes as the shape and data type it declares."""
    import numpy as np
    from numpy.lib import format as npy

    try:
        with open(path, "rb") as handle:
            version = npy.read_magic(handle)
            read_header = npy.read_array_header_2_0 if version >= (2, 0) else None
            shape, _, dtype = (read_header or npy.read_array_header_1_0)(handle)
            start = handle.tell()
    except (OSError, ValueError) as exc:
        return f"not a readable .npy file ({one_line(exc)})"
    if dtype.hasobject:
        return None  # pickled objects: the size says nothing (the workflow writes none)
    expected = start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        return f"{size} bytes, but its header declares {expected}"
    return None
