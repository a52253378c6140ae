"""numba, when it is there: the CPU loops that numpy would need several passes for.

numba is a dependency, but a platform without its wheels still runs everything: each
compiled loop has a torch or numpy twin that gives the same values, and its module's
``available()`` says which one runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    import numba
except ImportError:  # pragma: no cover - numba ships wheels for every platform we test on
    numba = None


def available() -> bool:
    """Whether numba can compile here."""
    return numba is not None


def compiled(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` compiled once per machine (cached beside its module, or in the user's
    cache when that is read-only), or unchanged without numba."""
    if numba is None:
        return function
    return numba.njit(cache=True, nogil=True)(function)
