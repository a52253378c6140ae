"""The whole default workflow (``snakemake --cores N`` on config/config.yaml, all three
families) of a baseline revision and of this checkout, side by side, from fresh folders.

Each repeat runs the baseline's workflow (a ``git worktree`` of ``--baseline``, its package
through ``PYTHONPATH``), then ours, each in an empty folder, so both see the same machine.
Printed per run: wall and CPU time (user + system of every job); then per rule the jobs'
summed wall time (from Snakemake's log, 1 s resolution), how busy the cores were, and the
critical path: the longest chain of jobs, each waiting for the one before (a job's inputs
are the outputs of the one before it), which no number of cores can shorten. Medians and
the ratio at the end.

    python benchmarks/bench_workflow.py [--cores 2] [--repeats 1] [--baseline REV]
        [--configfile config/config.yaml] [--dir /tmp/smoe-bench-workflow] [--target T ...]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from worktrees import baseline_tree

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "f4b562f"
"""main before the whole-workflow speed work (issue 21)."""

STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
START = re.compile(r"^(?:local)?rule (\w+):$")
FINISH = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$")


@dataclass
class Job:
    rule: str
    start: float
    end: float | None = None
    inputs: set[str] = field(default_factory=set)
    outputs: set[str] = field(default_factory=set)

    @property
    def seconds(self) -> float:
        return (self.end or self.start) - self.start


def parse_log(path: Path) -> dict[int, Job]:
    """Every job of a Snakemake log: rule, start and end (1 s resolution), inputs, outputs."""
    jobs: dict[int, Job] = {}
    stamp = None
    current: Job | None = None
    for line in path.read_text().splitlines():
        if match := STAMP.match(line):
            stamp = datetime.strptime(match[1], "%a %b %d %H:%M:%S %Y").timestamp()
            continue
        if (match := START.match(line)) and stamp is not None:
            current = Job(match[1], stamp)
            continue
        if match := FINISH.match(line):
            if int(match[1]) in jobs:
                jobs[int(match[1])].end = stamp
            current = None
            continue
        if current is None:
            continue
        key, _, value = line.strip().partition(": ")
        if key in ("input", "output"):
            files = {f.strip() for f in value.split(",") if f.strip()}
            (current.inputs if key == "input" else current.outputs).update(files)
        elif key == "jobid":
            jobs[int(value)] = current
    return {jobid: job for jobid, job in jobs.items() if job.end is not None}


def critical_path(jobs: dict[int, Job]) -> tuple[float, list[Job]]:
    """The longest chain of dependent jobs (by their wall times) and its length."""
    producer = {out: jobid for jobid, job in jobs.items() for out in job.outputs}
    best: dict[int, tuple[float, list[Job]]] = {}
    for jobid, job in sorted(jobs.items(), key=lambda item: item[1].start):
        before = [best[producer[f]] for f in job.inputs if f in producer and producer[f] in best]
        length, chain = max(before, key=lambda b: b[0], default=(0.0, []))
        best[jobid] = (length + job.seconds, [*chain, job])
    return max(best.values(), key=lambda b: b[0], default=(0.0, []))


def busy_cores(jobs: dict[int, Job], wall: float, cores: int) -> float:
    """Share of the cores' time spent inside jobs (1.0: every core busy all the run)."""
    return sum(job.seconds for job in jobs.values()) / (wall * cores) if wall else 0.0


def run_workflow(tree: Path, folder: Path, cores: int, configfile: str, targets: list[str]):
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    command = [sys.executable, "-m", "snakemake", *targets, "--cores", str(cores)]
    command += ["--snakefile", str(tree / "Snakefile"), "--directory", str(folder)]
    command += ["--configfile", str(tree / configfile)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=folder, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(f"{tree}: snakemake failed\n{result.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    (log,) = sorted((folder / ".snakemake" / "log").glob("*.snakemake.log"))[-1:]
    return wall, cpu, parse_log(log)


def per_rule(jobs: dict[int, Job]) -> dict[str, tuple[int, float]]:
    rules: dict[str, list[float]] = defaultdict(list)
    for job in jobs.values():
        rules[job.rule].append(job.seconds)
    return {rule: (len(times), sum(times)) for rule, times in rules.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--baseline", default=BASELINE, help="git revision to compare with")
    parser.add_argument("--configfile", default="config/config.yaml")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/smoe-bench-workflow"))
    parser.add_argument("--target", nargs="*", default=[], help="targets (default: all)")
    args = parser.parse_args()
    trees = {"baseline": baseline_tree(args.dir, args.baseline), "ours": ROOT}
    runs: dict[str, list[tuple[float, float, dict[int, Job]]]] = {name: [] for name in trees}
    for repeat in range(args.repeats):
        for name, tree in trees.items():
            folder = args.dir / f"{name}-run{repeat + 1}"
            wall, cpu, jobs = run_workflow(tree, folder, args.cores, args.configfile, args.target)
            runs[name].append((wall, cpu, jobs))
            print(
                f"repeat {repeat + 1} {name:8s}: wall {wall:7.1f} s  cpu {cpu:7.1f} s  "
                f"{len(jobs)} jobs, cores busy {busy_cores(jobs, wall, args.cores):.0%}",
                flush=True,
            )
    for name in trees:
        wall, cpu, jobs = runs[name][-1]
        print(f"\n{name} (last repeat): per rule, jobs and summed job wall time")
        for rule, (count, seconds) in sorted(per_rule(jobs).items(), key=lambda r: -r[1][1]):
            print(f"  {rule:30s} {count:3d}  {seconds:7.0f} s")
        length, chain = critical_path(jobs)
        print(f"  critical path {length:.0f} s: " + " -> ".join(job.rule for job in chain))
    walls = {name: statistics.median(r[0] for r in runs[name]) for name in trees}
    cpus = {name: statistics.median(r[1] for r in runs[name]) for name in trees}
    print(
        f"\nmedian wall: baseline {walls['baseline']:.1f} s, ours {walls['ours']:.1f} s, "
        f"ratio {walls['ours'] / walls['baseline']:.2f}"
    )
    print(
        f"median cpu:  baseline {cpus['baseline']:.1f} s, ours {cpus['ours']:.1f} s, "
        f"ratio {cpus['ours'] / cpus['baseline']:.2f}"
    )


if __name__ == "__main__":
    main()
