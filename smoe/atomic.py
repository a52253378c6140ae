"""Writes that never leave a half-written output under its final name.

Everything the workflow produces goes through these helpers: the output is written under
``<name>.partial`` and renamed into place only when complete, so a killed job leaves either
the previous output or nothing, never something that looks finished.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces ``final`` only if the block succeeds.

    A leftover ``.partial`` from a killed run is removed first; on error the scratch
    directory is removed and an existing ``final`` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if final.exists():
        previous = final.with_name(final.name + ".previous")
        if previous.exists():
            shutil.rmtree(previous)
        final.rename(previous)
        partial.rename(final)
        shutil.rmtree(previous)
    else:
        partial.rename(final)


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Like :func:`atomic_directory` for a single file (``os.replace`` is atomic)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.name + ".partial")
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
