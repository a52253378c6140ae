"""Per-worker throughput of two large runs, measured here, and the cluster they imply.

1. Simulation of a 512 x 512 map with 10,000 runs of 100 steps: ``smoe simulate`` of
   ``--sim-runs`` runs on one dask worker (one core) into an lz4 zarr store; printed are
   seconds and stored bytes per run, and for the full run the core-hours, the store's size
   and the nodes that finish it within ``--wall-hours``.
2. Training of ``config/paper.yaml``'s heat models with all their seeds: each trained model
   for ``--epochs`` epochs on the paper's data with ``--threads`` threads (one worker = one
   training job); printed are seconds per epoch, and for the worst case of the recipe (150
   epochs every training; early stopping only shortens it) the hours per training and the
   nodes that run every training of the matrix at once.

    python benchmarks/plan_large_run.py [--sim-runs 8] [--epochs 1] [--threads 2]
        [--cores-per-node 32] [--wall-hours 1] [--dir /tmp/smoe-plan]

The paper's stores are made in ``--dir`` by the workflow's rules (as benchmarks/bench_train.py
does; the same folder layout, so ``--dir /tmp/smoe-bench-train`` reuses them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_train import fresh_training, make_data  # noqa: E402

SIDE, RUNS, STEPS = 512, 10_000, 100


def run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-3000:]}")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def plan_simulation(work: Path, runs: int, cores_per_node: int, wall_hours: float) -> None:
    smoe = [sys.executable, "-m", "smoe"]
    mask = work / f"mask{SIDE}.npy"
    run([*smoe, "mask", "--height", str(SIDE), "--width", str(SIDE), "--out", str(mask)])
    store = work / f"sim{SIDE}.zarr"
    started = time.perf_counter()
    run(
        [
            *smoe,
            "simulate",
            "--mask",
            str(mask),
            "--diffusivity",
            "0.0025",
            "0.025",
            "0.25",
            "--runs",
            str(runs),
            "--seed",
            "42",
            "--steps",
            str(STEPS),
            "--scheduler",
            "synchronous",
            "--no-progress",
            "--overwrite",
            "--out",
            str(store),
        ]
    )
    seconds = (time.perf_counter() - started) / runs
    stored = folder_bytes(store) / runs
    core_hours = seconds * RUNS / 3600
    nodes = math.ceil(core_hours / (cores_per_node * wall_hours))
    print(
        f"simulation, {SIDE} x {SIDE}, {STEPS} steps: {seconds:.2f} s and {stored / 2**20:.0f} MiB "
        f"(lz4) per run on one worker ({runs} runs measured, start-up included)\n"
        f"  {RUNS:,} runs: {core_hours:.1f} core-hours, {stored * RUNS / 2**40:.2f} TiB of store; "
        f"{nodes} node(s) of {cores_per_node} cores finish it in {wall_hours:g} h "
        f"(one dask worker per core; the store's file system must take "
        f"{stored * RUNS / (wall_hours * 3600) / 2**20:.0f} MiB/s)"
    )


def plan_training(work: Path, epochs: int, threads: int, cores_per_node: int) -> None:
    data = make_data(work)
    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    config = dict(paper)
    config["train"] = {**paper["train"], "device": "cpu", "threads": threads, "epochs": epochs}
    config["train"].update(stop_at=None, early_stop=0)
    path = work / "plan-config.yaml"
    path.write_text(yaml.safe_dump(config))
    seeds = len(paper["seeds"])
    most_epochs = paper["train"]["epochs"]
    trainings, worst = 0, 0.0
    print(f"training, paper data, CPU, {threads} threads per job, {epochs} epoch(s) measured:")
    for name, model in paper["models"].items():
        if model["kind"] in ("persistence", "stencil", "generator"):
            continue  # nothing to learn: evaluated in seconds
        out = work / "plan-runs" / name
        run(fresh_training(path, name, data, out))
        summary = json.loads((out / "train.json").read_text())
        per_epoch = summary["train_time_s"] / summary["epochs"]
        hours = per_epoch * most_epochs / 3600
        trainings += seeds
        worst = max(worst, hours)
        print(
            f"  {name:11s} {per_epoch:6.1f} s/epoch; {most_epochs} epochs: {hours:.2f} h "
            f"per training, {seeds} seeds"
        )
    jobs_per_node = max(cores_per_node // threads, 1)
    nodes = math.ceil(trainings / jobs_per_node)
    print(
        f"  {trainings} trainings of {threads} threads: {nodes} node(s) of {cores_per_node} "
        f"cores run them all at once, in at most {worst:.2f} h (the slowest training at "
        f"{most_epochs} epochs; the recipe stops earlier at 100 % or after 30 epochs without "
        f"improvement)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sim-runs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cores-per-node", type=int, default=32)
    parser.add_argument("--wall-hours", type=float, default=1.0)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/smoe-plan"))
    parser.add_argument("--skip", choices=["simulation", "training"], default=None)
    args = parser.parse_args()
    work = args.dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"measured on {os.cpu_count()} cores")
    if args.skip != "simulation":
        plan_simulation(work, args.sim_runs, args.cores_per_node, args.wall_hours)
    if args.skip != "training":
        plan_training(work, args.epochs, args.threads, args.cores_per_node)


if __name__ == "__main__":
    main()
