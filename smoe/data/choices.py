"""Store options: accepted names and chunk sizes, without heavy imports.

The CLI lists the names and the workflow sizes job resources from the chunking at parse
time, so this module imports nothing beyond the standard library.
"""

import math

COMPRESSIONS = ("lz4", "zstd", "none")
SCHEDULERS = ("threads", "processes", "synchronous", "distributed")
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
