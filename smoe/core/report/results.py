"""Results as every family writes and reads them: one JSON file per model and seed, loaded
with a refusal that names the file, and mean ± std over seeds computed one way.

A family's table checks the keys of its own results; what is the same everywhere (the file
exists, is readable, is JSON, is an object; the mean and the ddof-1 standard deviation; the
atomic write) lives here once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from smoe.core.atomic import write_text_atomic
from smoe.core.errors import InputError, one_line


def read_json_result(
    path: str | Path, what: str = "an evaluation result", not_json_hint: str = ""
) -> dict[str, Any]:
    """A metrics JSON file as a dict. Missing, a folder, unreadable, not JSON or not a JSON
    object: an InputError naming the file (``what`` says what it should have been; a JSON
    syntax error gets ``not_json_hint`` appended)."""
    path = Path(path)
    name = repr(str(path))
    if not path.is_file():
        state = "is a folder" if path.is_dir() else "does not exist"
        raise InputError(f"metrics file {name} {state}")
    try:
        result = json.loads(path.read_bytes())
    except OSError as exc:
        raise InputError(f"metrics file {name} cannot be read ({exc.strerror or exc})") from exc
    except ValueError as exc:  # JSON syntax, or bytes that are not text
        raise InputError(
            f"metrics file {name} is not JSON ({one_line(exc)}){not_json_hint}"
        ) from exc
    if not isinstance(result, dict):
        raise InputError(f"metrics file {name} is not {what} (not a JSON object)")
    return result


def require_keys(result: dict[str, Any], keys: Iterable[str], name: str, what: str) -> None:
    """Refuse a result lacking any of ``keys``, naming the file (``name``) and the keys."""
    missing = [key for key in keys if key not in result]
    if missing:
        raise InputError(
            f"metrics file {name} is not {what}: it lacks {', '.join(map(repr, missing))}"
        )


def mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1) of the values that are not None; the std
    is NaN with one value, both are NaN with none."""
    numbers = np.array([v for v in values if v is not None], dtype=np.float64)
    if numbers.size == 0:
        return math.nan, math.nan
    std = float(numbers.std(ddof=1)) if numbers.size > 1 else math.nan
    return float(numbers.mean()), std


def write_json(result: dict[str, Any], out: str | Path) -> None:
    """A result as indented JSON, written atomically (a killed job leaves no half file)."""
    write_text_atomic(out, json.dumps(result, indent=2))
