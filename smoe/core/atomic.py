"""Writes that never leave a half-written output under its final name.

Everything the workflow produces goes through these helpers: the output is written under
``<name>.partial`` and renamed into place only when complete, so a killed job leaves either
the previous output or nothing, never something that looks finished.

An output that cannot be written at all (its folder is a file, or read-only; a folder where
a file is expected, or the other way round) is refused with an :class:`InputError` before
the caller's block runs, so no work is wasted and nothing that existed is touched;
:func:`check_output` runs the same checks without creating anything, for commands that want
to refuse before any work at all.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from smoe.core.errors import InputError


def _first_existing(path: Path) -> Path:
    """``path`` itself or its nearest ancestor that exists (at worst the current folder)."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path(".")


def check_output(path: str | Path, kind: str = "file") -> Path:
    """Refuse an output ``path`` that cannot be written, creating nothing.

    ``kind`` is ``file`` or ``folder`` (a folder output, e.g. a zarr store or a model
    folder). The nearest existing ancestor must be a writable folder; an existing ``path``
    must be of the right kind (and, for a folder written into, writable itself).
    """
    path = Path(path)
    name = repr(str(path))
    if path.exists():
        if kind == "file" and path.is_dir():
            raise InputError(
                f"output {name} is a folder, where a file is written: remove it or choose "
                "another output"
            )
        if kind == "folder" and not path.is_dir():
            raise InputError(
                f"output {name} is a file, where a folder is written: remove it or choose "
                "another output"
            )
    parent = _first_existing(path.parent)
    if not parent.is_dir():
        raise InputError(f"cannot write {name}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {name}: folder {str(parent)!r} is not writable")
    if kind == "folder" and path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"cannot write into {name}: the folder is not writable")
    return path


def make_parent(final: Path) -> None:
    """Create the folders above ``final``, or raise an InputError naming what is in the way."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = _first_existing(final.parent)
        raise InputError(
            f"cannot write {str(final)!r}: {str(blocker)!r} is a file, not a folder"
        ) from None
    except PermissionError:
        blocker = _first_existing(final.parent)
        raise InputError(
            f"cannot write {str(final)!r}: folder {str(blocker)!r} is not writable"
        ) from None


def _remove(path: Path) -> None:
    """Remove a file or a folder tree (a leftover of ours: ``.partial``, ``.previous``)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces ``final`` only if the block succeeds.

    A leftover ``.partial`` from a killed run is removed first; on error the scratch
    directory is removed and an existing ``final`` is left untouched. An existing ``final``
    that is a file is refused before the block runs: it is never moved aside.
    """
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise InputError(f"output {str(final)!r} is a file; a folder is written there")
    make_parent(final)
    partial = final.with_name(final.name + ".partial")
    _remove(partial)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if final.exists():
        previous = final.with_name(final.name + ".previous")
        _remove(previous)
        final.rename(previous)
        partial.rename(final)
        _remove(previous)
    else:
        partial.rename(final)


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Like :func:`atomic_directory` for a single file (``os.replace`` is atomic).

    An existing folder at ``final`` is refused before the block runs.
    """
    final = Path(final)
    if final.is_dir():
        raise InputError(f"output {str(final)!r} is a folder; a file is written there")
    make_parent(final)
    partial = final.with_name(final.name + ".partial")
    if partial.is_dir() and not partial.is_symlink():
        shutil.rmtree(partial)
    partial.unlink(missing_ok=True)
    try:
        yield partial
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(final)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file (JSON, CSV, Markdown) atomically."""
    path = Path(path)
    with atomic_file(path) as partial:
        partial.write_text(text)
    return path
