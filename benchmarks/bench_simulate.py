"""Heat-diffusion generator: `smoe simulate` against the reference generator, side by side.

Times, interleaved in one process on one machine (shared machines are noisy, so only ratios
measured together mean anything; medians over repeats are quoted):

* reference: the original algorithm (Python loops over runs and steps, one scipy
  ``convolve2d`` per region type; :mod:`smoe.families.heat.reference`), frames kept in memory;
* ours, in memory: the kernel on dask threads, no disk: the compiled loop
  (:mod:`smoe.families.heat.heat_loop`) and the numpy kernel it replaced, both bit for bit the same;
* ours, end to end: ``simulate_split``, the function behind ``smoe simulate``, writing a
  fresh zarr store (default lz4 compression), with its process CPU time (user, system);

and, in every repeat, the bounds of this machine: main-memory copy bandwidth (each cell
update must at least write its 4-byte float32 result), and what the store adds to the
kernel, each alone on one core: compressing the store's chunks with its codec (checked to
give the store's bytes) and writing those bytes as fresh files.

    python benchmarks/bench_simulate.py                 # paper train split, 3 repeats
    python benchmarks/bench_simulate.py --runs 300 --repeats 5 --dir scratch/
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import dask
import numpy as np
import zarr

from smoe.families.heat import heat_loop
from smoe.families.heat.choices import task_runs
from smoe.families.heat.mask import generate_mask
from smoe.families.heat.reference import reference_generate
from smoe.families.heat.simulation import HeatParams, plan_runs, simulate_plan
from smoe.families.heat.store import keep_freed_memory_mapped, simulate_split

PAPER = HeatParams((0.0025, 0.025, 0.25), steps=100)


def time_reference(mask, runs, seed):
    start = time.perf_counter()
    frames = reference_generate(mask, PAPER, seed, runs)
    elapsed = time.perf_counter() - start
    del frames
    return elapsed


def time_in_memory(mask, runs, seed, workers, compiled=True):
    """Seconds of the kernel on dask threads, no disk: the compiled loop (smoe's default
    where numba runs) or, with ``compiled=False``, the numpy kernel it replaced."""
    default = heat_loop.available
    heat_loop.available = default if compiled else (lambda: False)
    try:
        return _time_in_memory(mask, runs, seed, workers)
    finally:
        heat_loop.available = default


def _time_in_memory(mask, runs, seed, workers):
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
    """Seconds, stored bytes and the process's (user, system) CPU seconds of one store."""
    out = folder / "train.zarr"
    if out.exists():
        shutil.rmtree(out)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    simulate_split(mask, PAPER, seed, runs, out, workers=workers, progress=False)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    shutil.rmtree(out)
    return elapsed, size, cpu


def stored_chunks(mask, runs, seed, folder: Path) -> tuple[list[np.ndarray], list[bytes]]:
    """The field's chunks (frames) of the benchmark's store and their stored bytes."""
    out = folder / "chunks.zarr"
    simulate_split(mask, PAPER, seed, runs, out, progress=False)
    field = zarr.open_array(out / "u", mode="r")
    step = int(field.chunks[0])
    frames = [field[first : first + step] for first in range(0, runs, step)]
    encoded = [
        (out / "u" / field.metadata.encode_chunk_key((i, 0, 0, 0))).read_bytes()
        for i in range(len(frames))
    ]
    shutil.rmtree(out)
    return frames, encoded


def encode_seconds(frames: list[np.ndarray], encoded: list[bytes]) -> float:
    """Seconds to compress every chunk with the store's codec, one after another (one core)."""
    from numcodecs import Blosc

    # The store's codec (smoe.families.heat.store.compressors("lz4")): blosc lz4, level 5, byte
    # shuffle, 4-byte items, automatic block size.
    codec = Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE, typesize=4)
    start = time.perf_counter()
    ours = [codec.encode(chunk) for chunk in frames]
    elapsed = time.perf_counter() - start
    if ours != encoded:
        raise RuntimeError("the codec timed here does not give the store's bytes")
    return elapsed


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


def write_seconds(folder: Path, encoded: list[bytes]) -> float:
    """Seconds to write the store's chunk bytes as fresh files, one folder each as in a store.

    No fsync, like the store itself: the bytes land in the page cache, whose cost depends
    on the machine (on a VM, fresh pages may first have to be backed by the host).
    """
    root = folder / "files"
    start = time.perf_counter()
    for i, data in enumerate(encoded):
        path = root / str(i) / "0" / "0"
        path.mkdir(parents=True)
        (path / "0").write_bytes(data)
    elapsed = time.perf_counter() - start
    shutil.rmtree(root)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs (paper train split: 1000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--dir", type=Path, default=None, help="scratch folder for the stores (made if missing)"
    )
    args = parser.parse_args()

    keep_freed_memory_mapped()  # as `smoe simulate` does
    mask = generate_mask(64, 64, 3, seed=42)
    updates = args.runs * PAPER.steps * mask.size
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="bench_simulate_", dir=args.dir))
    print(
        f"{args.runs} runs x {PAPER.steps} steps x 64x64 = {updates:.3g} cell updates, "
        f"{args.workers} workers, {args.repeats} repeats, scratch {folder}"
    )
    reference, in_memory, numpy_kernel, end_to_end, sizes, cpu = [], [], [], [], [], []
    memory, encode, write = [], [], []
    try:
        frames, encoded = stored_chunks(mask, args.runs, 42, folder)
        time_in_memory(mask, min(args.runs, 40), 42, args.workers)  # warm-up (and compile)
        for repeat in range(args.repeats):
            reference.append(time_reference(mask, args.runs, 42))
            numpy_kernel.append(time_in_memory(mask, args.runs, 42, args.workers, False))
            in_memory.append(time_in_memory(mask, args.runs, 42, args.workers))
            elapsed, size, used = time_end_to_end(mask, args.runs, 42, args.workers, folder)
            end_to_end.append(elapsed)
            sizes.append(size)
            cpu.append(used)
            memory.append(memory_bandwidth())
            encode.append(encode_seconds(frames, encoded))
            write.append(write_seconds(folder, encoded))
            print(
                f"  repeat {repeat + 1}: reference {reference[-1]:.2f} s, in memory "
                f"{in_memory[-1]:.2f} s (numpy kernel {numpy_kernel[-1]:.2f} s), end to end "
                f"{end_to_end[-1]:.2f} s "
                f"({end_to_end[-1] / in_memory[-1]:.1f}x in memory; CPU user {used[0]:.2f} s, "
                f"system {used[1]:.2f} s), memory {memory[-1] / 1e9:.1f} GB/s, lz4 "
                f"{encode[-1]:.2f} s, file writes {write[-1]:.2f} s"
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    median = statistics.median
    ref, mem, e2e = (median(x) for x in (reference, in_memory, end_to_end))
    numpy_mem = median(numpy_kernel)
    raw_bytes = updates / PAPER.steps * (PAPER.steps + 1) * 4
    stored_bytes = median(sizes)
    bandwidth = max(memory)  # the bound: the best the machine showed
    memory_bound = bandwidth / 8  # 4-byte result written: 8 bytes of traffic with write-allocate
    print()
    print(f"{'':28s} {'median s':>9s} {'cell updates/s':>15s} {'vs reference':>13s}")
    for name, seconds in (
        ("reference (convolve2d loop)", ref),
        ("smoe, in memory, numpy", numpy_mem),
        ("smoe, in memory", mem),
        ("smoe simulate, zarr store", e2e),
    ):
        print(f"{name:28s} {seconds:9.2f} {updates / seconds:15.3g} {ref / seconds:12.1f}x")
    print()
    print(
        f"memory copy bandwidth      {bandwidth / 1e9:6.2f} GB/s (best of repeats) -> bound "
        f"{memory_bound:.3g} updates/s, {updates / memory_bound:.3f} s; in memory reaches "
        f"{updates / mem / memory_bound:.0%} of it (the numpy kernel "
        f"{updates / numpy_mem / memory_bound:.0%}; compiled loop {numpy_mem / mem:.2f}x faster)"
    )
    ratios = [e / m for e, m in zip(end_to_end, in_memory, strict=True)]
    user, system = median(c[0] for c in cpu), median(c[1] for c in cpu)
    print(
        f"end to end / in memory     {e2e / mem:.2f}x (medians; per repeat "
        f"{', '.join(f'{r:.2f}' for r in ratios)}); its CPU time: user {user:.2f} s, "
        f"system {system:.2f} s"
    )
    print(
        f"what the store adds, alone on one core: lz4 compression {median(encode):.2f} s, "
        f"file writes {median(write):.2f} s ({stored_bytes / 1e9:.2f} GB, "
        f"{raw_bytes / stored_bytes:.2f}x compressed, {stored_bytes / median(write) / 1e9:.2f} "
        f"GB/s); {(median(encode) + median(write)) / mem:.1f}x the in-memory time"
    )
    print(f"throughput ratio (end to end, median): {ref / e2e:.1f}x; in memory: {ref / mem:.1f}x")


if __name__ == "__main__":
    main()
