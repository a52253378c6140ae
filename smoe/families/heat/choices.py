"""Simulation and store options: accepted names and chunk sizes, without heavy imports.

The CLI lists the names and the workflow sizes job resources from the chunking at parse
time, so this module imports nothing beyond the standard library.
"""

import math
import re

STORE_REDO = "rerun the simulation"
"""What regenerates a heat store, for the message refusing a missing or unfinished one."""

COMPRESSIONS = ("lz4", "zstd", "none")
BOUNDARIES = ("zero", "wrap")
INIT_KINDS = ("uniform", "zero")
SCHEDULERS = ("threads", "processes", "synchronous", "distributed")
SCHEDULER_ADDRESS = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})/?$")
"""A running dask scheduler's address, ``tcp://HOST:PORT`` (an IPv6 host in brackets); the
config schema's pattern for ``compute.scheduler`` says the same."""


def scheduler_address(scheduler: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``tcp://`` scheduler address, None for a local scheduler's name;
    ValueError for anything else (syntax only: nothing is contacted)."""
    if scheduler in SCHEDULERS:
        return None
    match = SCHEDULER_ADDRESS.match(scheduler)
    if match is None or not 1 <= int(match[2]) <= 65535:
        raise ValueError(
            f"scheduler {scheduler!r} is neither one of {', '.join(SCHEDULERS)} nor the "
            "address of a running dask scheduler, tcp://HOST:PORT (e.g. tcp://node12:8786)"
        )
    return match[1].strip("[]"), int(match[2])


TARGET_CHUNK_BYTES = 8 * 2**20
"""Stored chunks of about 8 MiB: big enough for fast I/O, small enough for lazy reads."""
TARGET_TASK_RUNS = 32
"""Runs per dask task: amortises the kernel's Python overhead across whole chunks."""


def chunk_runs(steps: int, height: int, width: int) -> int:
    """Runs per stored chunk so that one chunk is about :data:`TARGET_CHUNK_BYTES`."""
    run_bytes = (steps + 1) * height * width * 4
    return max(1, TARGET_CHUNK_BYTES // run_bytes)


def task_runs(runs: int, runs_per_chunk: int, workers: int) -> int:
    """Runs per dask task: whole stored chunks, about 32 runs, enough tasks for the workers."""
    per_task = runs_per_chunk * max(1, math.ceil(TARGET_TASK_RUNS / runs_per_chunk))
    while per_task > runs_per_chunk and math.ceil(runs / per_task) < 2 * workers:
        per_task -= runs_per_chunk
    return per_task
