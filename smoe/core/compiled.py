"""numba, when it is there: the CPU loops that numpy would need several passes for.

numba is a dependency, but a platform without its wheels still runs everything: each
compiled loop has a torch or numpy twin that gives the same values, and its module's
``available()`` says which one runs. numba is imported on the first call of a compiled
loop, not when its module is imported: a command that never runs one (``smoe --help``,
an evaluation, a figure) does not pay numba's half second of start-up.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


@functools.cache
def available() -> bool:
    """Whether numba can compile here (imports it on the first question)."""
    try:
        import numba  # noqa: F401
    except ImportError:  # pragma: no cover - numba ships wheels for every platform we test on
        return False
    return True


def compiled(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` compiled on its first call, once per machine (cached beside its module,
    or in the user's cache when that is read-only), or unchanged without numba."""
    loop: list[Callable[..., Any]] = []

    @functools.wraps(function)
    def run(*args: Any) -> Any:
        if not loop:
            if available():
                import numba

                loop.append(numba.njit(cache=True, nogil=True)(function))
            else:
                loop.append(function)
        return loop[0](*args)

    return run
