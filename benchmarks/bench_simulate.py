"""Heat-diffusion generator: `smoe simulate` against the reference generator, side by side.

Times, interleaved in one process on one machine (shared machines are noisy, so only ratios
measured together mean anything; medians over repeats are quoted):

* reference: the original algorithm (Python loops over runs and steps, one scipy
  ``convolve2d`` per region type; :mod:`smoe.data.reference`), frames kept in memory;
* ours, in memory: the vectorised kernel on dask threads, no disk;
* ours, end to end: ``simulate_split``, the function behind ``smoe simulate``, writing a
  fresh zarr store (default lz4 compression);

and the bounds of this machine measured in the same run: main-memory copy bandwidth (each
cell update must at least write its 4-byte float32 result) and file write bandwidth
(the same number of bytes as the store, written as plain files).

    python benchmarks/bench_simulate.py                 # paper train split, 3 repeats
    python benchmarks/bench_simulate.py --runs 200 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import dask
import numpy as np

from smoe.data.choices import task_runs
from smoe.data.heat import HeatParams, plan_runs, simulate_plan
from smoe.data.mask import generate_mask
from smoe.data.reference import reference_generate
from smoe.data.store import keep_freed_memory_mapped, simulate_split

PAPER = HeatParams((0.0025, 0.025, 0.25), steps=100)


def time_reference(mask, runs, seed):
    start = time.perf_counter()
    frames = reference_generate(mask, PAPER, seed, runs)
    elapsed = time.perf_counter() - start
    del frames
    return elapsed


def time_in_memory(mask, runs, seed, workers):
    start = time.perf_counter()
    plan = plan_runs(mask, PAPER, seed, runs)
    per_task = task_runs(runs, 5, workers)
    tasks = [
        dask.delayed(simulate_plan, traverse=False)(
            mask, PAPER, plan.select(s, min(s + per_task, runs))
        )
        for s in range(0, runs, per_task)
    ]
    blocks = dask.compute(*tasks, scheduler="threads", num_workers=workers)
    elapsed = time.perf_counter() - start
    del blocks
    return elapsed


def time_end_to_end(mask, runs, seed, workers, folder: Path):
    out = folder / "train.zarr"
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    simulate_split(mask, PAPER, seed, runs, out, workers=workers, progress=False)
    elapsed = time.perf_counter() - start
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    shutil.rmtree(out)
    return elapsed, size


def memory_bandwidth(megabytes=512, repeats=5):
    """Bytes moved per second by a large numpy copy (read + write), best of repeats."""
    source = np.ones(megabytes * 2**20 // 8)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best


def write_bandwidth(folder: Path, total_bytes: int):
    """Bytes per second written to fresh 8 MiB files in ``folder``, as many as the store holds.

    No fsync, like the store itself: small writes land in the page cache, sustained ones run
    at the disk's pace once the kernel throttles dirty pages, so the size must match.
    """
    block = np.random.default_rng(0).bytes(8 * 2**20)
    count = max(1, total_bytes // len(block))
    start = time.perf_counter()
    for i in range(count):
        (folder / f"block{i}").write_bytes(block)
    elapsed = time.perf_counter() - start
    for i in range(count):
        (folder / f"block{i}").unlink()
    return count * len(block) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs (paper train split: 1000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder for the stores")
    args = parser.parse_args()

    keep_freed_memory_mapped()  # as `smoe simulate` does
    mask = generate_mask(64, 64, 3, seed=42)
    updates = args.runs * PAPER.steps * mask.size
    folder = Path(tempfile.mkdtemp(prefix="bench_simulate_", dir=args.dir))
    print(
        f"{args.runs} runs x {PAPER.steps} steps x 64x64 = {updates:.3g} cell updates, "
        f"{args.workers} workers, {args.repeats} repeats, scratch {folder}"
    )
    reference, in_memory, end_to_end, sizes = [], [], [], []
    try:
        time_in_memory(mask, min(args.runs, 40), 42, args.workers)  # warm-up
        for repeat in range(args.repeats):
            reference.append(time_reference(mask, args.runs, 42))
            in_memory.append(time_in_memory(mask, args.runs, 42, args.workers))
            elapsed, size = time_end_to_end(mask, args.runs, 42, args.workers, folder)
            end_to_end.append(elapsed)
            sizes.append(size)
            print(
                f"  repeat {repeat + 1}: reference {reference[-1]:.2f} s, in memory "
                f"{in_memory[-1]:.2f} s, end to end {end_to_end[-1]:.2f} s"
            )
        memory = memory_bandwidth()
        disk = write_bandwidth(folder, int(statistics.median(sizes)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    ref, mem, e2e = (statistics.median(x) for x in (reference, in_memory, end_to_end))
    raw_bytes = updates / PAPER.steps * (PAPER.steps + 1) * 4
    stored_bytes = statistics.median(sizes)
    memory_bound = memory / 8  # 4-byte result written: 8 bytes of traffic with write-allocate
    disk_bound_seconds = stored_bytes / disk
    print()
    print(f"{'':28s} {'median s':>9s} {'cell updates/s':>15s} {'vs reference':>13s}")
    for name, seconds in (
        ("reference (convolve2d loop)", ref),
        ("smoe, in memory", mem),
        ("smoe simulate, zarr store", e2e),
    ):
        print(f"{name:28s} {seconds:9.2f} {updates / seconds:15.3g} {ref / seconds:12.1f}x")
    print()
    print(
        f"memory copy bandwidth     {memory / 1e9:6.2f} GB/s -> bound {memory_bound:.3g} "
        f"updates/s; in-memory run reaches {updates / mem / memory_bound:.0%} of it"
    )
    print(
        f"file write bandwidth      {disk / 1e9:6.2f} GB/s -> writing the store "
        f"({stored_bytes / 1e9:.2f} GB, {raw_bytes / stored_bytes:.2f}x compressed) alone "
        f"takes {disk_bound_seconds:.2f} s, {disk_bound_seconds / e2e:.0%} of end to end"
    )
    print(f"throughput ratio (end to end, median): {ref / e2e:.1f}x; in memory: {ref / mem:.1f}x")


if __name__ == "__main__":
    main()
