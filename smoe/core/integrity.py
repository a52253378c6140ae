"""The inputs of a planned run checked before any job starts, so a damaged file costs nothing.

Snakemake deletes a job's old outputs when the job starts; a job that then refuses a damaged
input (a truncated chunk, a garbled checkpoint or metrics file) has already cost them, and
rerunning gives the same refusal. The workflow's ``onstart`` handler (Snakemake calls it for
a real run once the jobs are planned, before the first job starts and before any output is
deleted) hands the planned jobs to :func:`check_planned_run`. Only what this run will read
and not rewrite is checked: the existing inputs of the jobs that will run, less the files a
job of this run makes anew; a run with nothing to do checks nothing.

Each input is checked by its rule's own check when its family gives one (the gated family's
source files, ``checks``), else by its kind (:mod:`smoe.core.file_checks`,
:mod:`smoe.core.store_check`); a kind with no check is left to its job. A damaged input is
one error line naming the file, what is wrong and how to regenerate it; the run stops with
nothing deleted. A training job whose output folder holds a ``last.pt`` that cannot be read
gets a warning: it starts from scratch instead of resuming.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from smoe.core.errors import describe_os_error
from smoe.core.file_checks import (
    Check,
    checkpoint_problem,
    csv_problem,
    json_problem,
    netcdf_problem,
    npy_problem,
)
from smoe.core.store_check import store_problems, summary
from smoe.core.zarr_store import STORE_HEAD

BY_SUFFIX: dict[str, Check] = {
    ".pt": checkpoint_problem,
    ".json": json_problem,
    ".csv": csv_problem,
    ".nc": netcdf_problem,
    ".npy": npy_problem,
}
"""The check of each kind of file the workflow writes, by its suffix."""


@dataclass(frozen=True)
class PlannedJob:
    """One job Snakemake will run: its rule, its input and output files, and which of its
    inputs some job of the workflow makes (the others are source files, kept by the user)."""

    rule: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    made: frozenset[str] = frozenset()


def planned_jobs(dag) -> list[PlannedJob]:
    """The jobs of Snakemake's ``dag`` that will run, as :class:`PlannedJob` records."""
    made = frozenset(str(f) for job in dag.jobs for f in job.output)
    return [
        PlannedJob(
            rule=job.rule.name,
            inputs=tuple(str(f) for f in job.input),
            outputs=tuple(str(f) for f in job.output),
            made=made & frozenset(str(f) for f in job.input),
        )
        for job in dag.needrun_jobs()
    ]


def input_problem(path: Path, check: Check | None = None) -> str | None:
    """What is wrong with one input (None: it looks whole); ``check`` replaces the check of
    its kind. A store's root ``zarr.json`` stands for the whole store. A file or folder this
    user cannot read is refused too: its job could not read it either."""
    try:
        if check is not None:
            return check(path)
        if path.name == STORE_HEAD:
            problems = store_problems(path.parent)
            return summary(problems) if problems else None
        kind = BY_SUFFIX.get(path.suffix)
        return kind(path) if kind else None
    except OSError as exc:
        return f"cannot be read ({describe_os_error(exc)})"


def regenerate(path: str, made: bool) -> str:
    """How to get a good copy of ``path``. A store is removed: every family's targets name
    its stores, so Snakemake makes a missing one again. Another workflow output (a
    checkpoint, a history, a metrics file) is made again by forcing its job: removed, it
    could stay missing, since Snakemake does not rerun a job for a missing file that no
    target names when what was made from it is up to date. A source file is the user's."""
    if not made:
        return "replace it with a good copy, then rerun snakemake"
    if Path(path).name == STORE_HEAD:
        store = str(Path(path).parent)
        return f"regenerate it: rm -r {shlex.quote(store)}, then rerun snakemake"
    return (
        f"regenerate it: rerun snakemake with --forcerun {shlex.quote(path)} (its job runs "
        "again, then every job that reads it)"
    )


def damaged_inputs(jobs: Iterable[PlannedJob], checks: Mapping[str, Check]) -> list[str]:
    """One line per damaged input the run would read without rewriting it (each file checked
    once); ``checks``: a rule's own check of its inputs, by rule name."""
    jobs = list(jobs)
    rewritten = {path for job in jobs for path in job.outputs}
    seen: set[str] = set()
    lines = []
    for job in jobs:
        for path in job.inputs:
            if path in rewritten or path in seen or not Path(path).exists():
                continue
            seen.add(path)
            problem = input_problem(Path(path), checks.get(job.rule))
            if problem:
                shown = str(Path(path).parent) if Path(path).name == STORE_HEAD else path
                lines.append(
                    f"damaged input {shown}: {problem}; no job was started and nothing was "
                    f"deleted: {regenerate(path, path in job.made)}"
                )
    return lines


def restart_warnings(jobs: Iterable[PlannedJob]) -> list[str]:
    """One line per training that will start from scratch because the ``last.pt`` beside
    its ``best.pt`` output cannot be read (the job's log and ``train.json`` say why too)."""
    lines = []
    for job in jobs:
        for path in job.outputs:
            last = Path(path).with_name("last.pt")
            if Path(path).name != "best.pt" or not last.is_file():
                continue
            problem = checkpoint_problem(last)
            if problem:
                lines.append(
                    f"{last} cannot be resumed ({problem}): the training of "
                    f"{last.parent} (rule {job.rule}) starts from scratch"
                )
    return lines


def check_planned_run(
    dag, checks: Mapping[str, Check], warn: Callable[[str], None], error: Callable[[str], None]
) -> bool:
    """Warn about trainings that restart, report every damaged input; False when the run
    must stop (an input is damaged)."""
    jobs = planned_jobs(dag)
    for line in restart_warnings(jobs):
        warn(line)
    damaged = damaged_inputs(jobs, checks)
    for line in damaged:
        error(line)
    return not damaged
