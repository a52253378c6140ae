"""profiles/slurm against a real Slurm cluster: the Slurm CI step (issue 12).

`bash .ci/slurm/run-test.sh` starts a single-node cluster on loopback (.ci/slurm/cluster.sh:
munged, MariaDB, slurmdbd, slurmctld, slurmd) and runs this module; without that cluster (the
script sets SMOE_SLURM_CLUSTER=up) every test here is skipped, so the plain `python -m
pytest` never tries it.

The tiny config of every enabled family (config/test.yaml plus tests/slurm/families.yaml)
runs twice, on a copy of the workflow and package: through `snakemake --profile <copy of
profiles/slurm>` (the copy has the two marked placeholders filled in, which is all a user
edits) and locally with `snakemake --cores 2`. Then sacct must show one COMPLETED Slurm job
for every rule instance Snakemake ran, each asking for what its rule declares, and the two
runs' results must be equal (see test_outputs_equal_a_local_run for what "equal" leaves
out).
"""

import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

CLUSTER_UP = os.environ.get("SMOE_SLURM_CLUSTER") == "up" and shutil.which("sacct") is not None
pytestmark = [
    pytest.mark.slurm,
    # the first test builds every family of the tiny config twice (Slurm and local, side by
    # side: about 10 min on 2 cores), longer than the suite's 600 s per test
    pytest.mark.timeout(1800),
    pytest.mark.slow,
    pytest.mark.skipif(
        not CLUSTER_UP,
        reason="no Slurm cluster: `bash .ci/slurm/run-test.sh` starts one and runs these tests",
    ),
]

HERE = Path(__file__).resolve().parent
FAMILIES = HERE / "families.yaml"
PARTITION = os.environ.get("SMOE_SLURM_PARTITION", "smoe-ci")
ACCOUNT = os.environ.get("SMOE_SLURM_ACCOUNT", "smoe-ci")
# What profiles/slurm/profile.yaml holds until a user edits it.
PLACEHOLDERS = {"slurm_partition": "EDIT_ME_PARTITION", "slurm_account": "EDIT_ME_ACCOUNT"}
# The executor plugin waits 40 s before its first sacct poll (then 10 s more each time
# no job finished); the tiny workflow's jobs take seconds.
PLUGIN_OPTIONS = ["--slurm-init-seconds-before-status-checks", "1"]
SACCT_FIELDS = [
    "JobIDRaw",
    "Comment",
    "State",
    "ExitCode",
    "Partition",
    "Account",
    "ReqTRES",
    "AllocTRES",
    "Timelimit",
    "TotalCPU",
]


@dataclass
class Run:
    workdir: Path
    log: str  # Snakemake's stderr
    wall_s: float


def snakemake(workflow, workdir, *args, configs=()):
    """`python -m snakemake ARGS` on ``workflow``'s Snakefile and the tiny configs of every
    family (then ``configs``), in ``workdir``, timed. The jobs' `smoe` commands import the
    package of ``workflow`` too (PYTHONPATH, which the Slurm jobs inherit)."""
    command = [
        sys.executable,
        "-m",
        "snakemake",
        *args,
        "--snakefile",
        str(workflow / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workflow / "config" / "test.yaml"),
        str(FAMILIES),
        *map(str, configs),
    ]
    environment = {k: v for k, v in os.environ.items() if k != "SMOE_GPU_CHECK"}
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(workflow), environment.get("PYTHONPATH")])
    )
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir, env=environment)
    return result, time.monotonic() - start


@pytest.fixture(scope="module")
def workflow(repo, tmp_path_factory):
    """The workflow and the package as they are now, copied: both runs (minutes apart, side
    by side) see the same code even while the checkout is being edited."""
    copy = tmp_path_factory.mktemp("workflow")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copy2(repo / "Snakefile", copy / "Snakefile")
    for folder in ("workflow", "config", "envs", "profiles", "smoe"):
        shutil.copytree(repo / folder, copy / folder, ignore=ignore)
    return copy


@pytest.fixture(scope="module")
def profile(workflow, tmp_path_factory):
    """profiles/slurm as a user makes it theirs: the two marked placeholders replaced by
    this cluster's partition and account, nothing else touched."""
    text = (workflow / "profiles" / "slurm" / "profile.yaml").read_text()
    for key, placeholder in PLACEHOLDERS.items():
        assert f'{key}: "{placeholder}"' in text, f"profiles/slurm lost its {key} placeholder"
    text = text.replace(PLACEHOLDERS["slurm_partition"], PARTITION)
    text = text.replace(PLACEHOLDERS["slurm_account"], ACCOUNT)
    folder = tmp_path_factory.mktemp("profile")
    (folder / "profile.yaml").write_text(text)
    settings = yaml.safe_load(text)
    assert settings["executor"] == "slurm"
    return folder


@pytest.fixture(scope="module")
def runs(workflow, profile, tmp_path_factory):
    """The Slurm run and the local one (`snakemake --cores 2`), side by side: the Slurm
    run's jobs leave the machine's cores idle while they are submitted and polled, which
    the local run fills. Their wall times overlap; README states each one measured alone."""
    slurm_dir, local_dir = tmp_path_factory.mktemp("slurm"), tmp_path_factory.mktemp("local")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    with ThreadPoolExecutor(2) as pool:
        local = pool.submit(snakemake, workflow, local_dir, "--cores", "2")
        slurm = pool.submit(
            snakemake, workflow, slurm_dir, "--profile", str(profile), *PLUGIN_OPTIONS
        )
        (slurm_result, slurm_wall), (local_result, local_wall) = slurm.result(), local.result()
    assert slurm_result.returncode == 0, slurm_result.stderr[-5000:]
    assert local_result.returncode == 0, local_result.stderr[-5000:]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    print(
        f"\ntiny workflow side by side: through profiles/slurm {slurm_wall:.0f} s, "
        f"locally (--cores 2) {local_wall:.0f} s; CPU of the local run and of Snakemake's "
        f"main process on Slurm {cpu:.0f} s"
    )
    return Run(slurm_dir, slurm_result.stderr, slurm_wall), Run(
        local_dir, local_result.stderr, local_wall
    )


@pytest.fixture(scope="module")
def slurm_run(runs):
    return runs[0]


@pytest.fixture(scope="module")
def local_run(runs):
    return runs[1]


# -- what Snakemake ran, and what Slurm recorded -------------------------------------------


@dataclass
class Job:
    rule: str
    local: bool
    threads: int
    resources: dict


def snakemake_jobs(log):
    """jobid -> Job, from the job blocks Snakemake prints when it starts each job."""
    jobs = {}
    for match in re.finditer(r"^(local)?rule (\w+):\n((?:    .*\n)+)", log, re.MULTILINE):
        fields = dict(line.strip().split(": ", 1) for line in match[3].splitlines() if ": " in line)
        resources = dict(
            item.split("=", 1) for item in fields.get("resources", "").split(", ") if item
        )
        jobs[int(fields["jobid"])] = Job(
            rule=match[2],
            local=bool(match[1]),
            threads=int(fields.get("threads", 1)),
            resources=resources,
        )
    return jobs


def job_stats(log):
    """rule -> count, from the "Job stats" table Snakemake prints before it starts."""
    table = log.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    counts = {}
    for line in table.splitlines()[3:]:  # title, header, rule
        name, count = line.split()
        if name != "total":
            counts[name] = int(count)
    return counts


def submitted(log):
    """Snakemake jobid -> Slurm job id, from the executor plugin's messages."""
    pattern = r"Job (\d+) has been submitted with SLURM jobid (\d+)"
    return {int(job): slurm_id for job, slurm_id in re.findall(pattern, log)}


def run_id(log):
    return re.search(r"SLURM run ID: (\S+)", log)[1]


def sacct(run, steps=False):
    """The run's Slurm jobs as sacct lists them from the accounting database (the plugin
    names every job of a run after the run's id). Accounting can lag a job's end by a
    moment, so ask until every submitted job is there."""
    wanted = set(submitted(run.log).values())
    command = [
        "sacct",
        *([] if steps else ["-X"]),  # -X: the jobs alone, without their steps
        "--parsable2",
        "--noheader",
        "--starttime",
        "now-1days",
        "--name",
        run_id(run.log),
        "--format",
        ",".join(SACCT_FIELDS),
    ]
    for _ in range(30):
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rows = [
            dict(zip(SACCT_FIELDS, line.split("|"), strict=True))
            for line in out.split("\n")
            if line
        ]
        if {row["JobIDRaw"] for row in rows} >= wanted:
            break
        time.sleep(1)
    return {row["JobIDRaw"]: row for row in rows}


def comment_rule(comment):
    """The rule a job ran: the plugin's --comment is rule_<rule>[_wildcards_<values>]."""
    assert comment.startswith("rule_"), comment
    return comment[len("rule_") :].split("_wildcards_", 1)[0]


def tres(text):
    return dict(item.split("=", 1) for item in text.split(",") if item)


def test_every_job_ran_as_a_slurm_job(slurm_run):
    jobs = snakemake_jobs(slurm_run.log)
    stats = job_stats(slurm_run.log)
    ids = submitted(slurm_run.log)
    records = sacct(slurm_run)

    # Snakemake's own count of the jobs, rule by rule, against the jobs it started
    assert Counter(job.rule for job in jobs.values()) == Counter(stats)
    # only `rule all` (a target with no command) stays on this machine
    assert {job.rule for job in jobs.values() if job.local} == {"all"}
    remote = {jobid for jobid, job in jobs.items() if not job.local}
    assert set(ids) == remote
    # and Slurm ran each of them, to completion, where the profile sent it
    assert set(records) == set(ids.values())
    assert Counter(comment_rule(r["Comment"]) for r in records.values()) == Counter(
        {rule: count for rule, count in stats.items() if rule != "all"}
    )
    for record in records.values():
        assert (record["State"], record["ExitCode"]) == ("COMPLETED", "0:0"), record
        assert (record["Partition"], record["Account"]) == (PARTITION, ACCOUNT), record
    assert len(records) == sum(stats.values()) - 1
    # a job's TotalCPU, its steps' together, is on its own line only when steps are listed
    cpu = sum(
        seconds(record["TotalCPU"])
        for jobid, record in sacct(slurm_run, steps=True).items()
        if "." not in jobid
    )
    print(f"\n{len(records)} Slurm jobs, {cpu:.0f} CPU seconds between them (sacct TotalCPU)")


def seconds(duration):
    """sacct's [D-][HH:]MM:SS[.mmm] in seconds."""
    days, _, clock = duration.rpartition("-")
    total = 0.0
    for part in clock.split(":"):
        total = 60 * total + float(part)
    return int(days or 0) * 86400 + total


def minutes(timelimit):
    return seconds(timelimit) / 60


def test_jobs_ask_for_what_their_rules_declare(slurm_run):
    """threads -> CPUs, mem_mb -> memory, runtime -> time limit, and no GPU for a job whose
    rule asks for none (the tiny config trains on CPUs: gpu=0 or no gpu resource)."""
    jobs = snakemake_jobs(slurm_run.log)
    records = sacct(slurm_run)
    for jobid, slurm_id in submitted(slurm_run.log).items():
        job, record = jobs[jobid], records[slurm_id]
        asked = tres(record["ReqTRES"])
        where = f"{job.rule} (Slurm job {slurm_id}): {record}"
        assert comment_rule(record["Comment"]) == job.rule, where
        assert int(asked["cpu"]) == job.threads, where
        assert asked["mem"] == f"{job.resources['mem_mb']}M", where
        assert minutes(record["Timelimit"]) == int(job.resources["runtime"]), where
        assert int(job.resources.get("gpu", 0)) == 0, where
        assert "gres/gpu" not in asked and "gres/gpu" not in record["AllocTRES"], where


def test_gpu_rules_get_a_gpu(workflow, slurm_run, profile, tmp_path):
    """With train.device: cuda the train rule asks for gpu=1, and Slurm gives the job the
    cluster's GPU. The loopback cluster's GPU is /dev/null, so the training itself stops
    at "no GPU is usable" inside the job: that message is the proof it ran there, with a
    GPU allocated. Only that job runs, on data copied from the Slurm run."""
    workdir = tmp_path / "gpu"
    shutil.copytree(slurm_run.workdir, workdir, symlinks=True)
    shutil.rmtree(workdir / ".snakemake" / "slurm_logs", ignore_errors=True)
    cuda = tmp_path / "cuda.yaml"
    cuda.write_text("train: {device: cuda}\n")
    target = "results/test/models/cnn/seed0/best.pt"
    result, _ = snakemake(
        workflow,
        workdir,
        target,
        "--profile",
        str(profile),
        *PLUGIN_OPTIONS,
        "--retries",
        "0",
        # the copied data counts as up to date whatever changed since (only file times
        # decide), and the training runs again with its new device
        "--rerun-triggers",
        "mtime",
        "--forcerun",
        "train",
        configs=[cuda],
    )
    run = Run(workdir, result.stderr, 0)
    assert result.returncode != 0, "a training on a /dev/null GPU cannot succeed"
    # the config check knew the jobs leave this machine: a warning, not a refusal
    assert "the run targets the 'slurm' executor" in result.stderr, result.stderr[-3000:]
    jobs = snakemake_jobs(run.log)
    ids = submitted(run.log)
    assert [jobs[jobid].rule for jobid in ids] == ["train"], result.stderr[-3000:]
    assert jobs[next(iter(ids))].resources["gpu"] == "1"
    (record,) = sacct(run).values()
    assert tres(record["ReqTRES"])["gres/gpu"] == "1", record
    assert tres(record["AllocTRES"])["gres/gpu"] == "1", record
    assert record["State"] == "FAILED", record
    log = (workdir / "results/test/logs/train/cnn_seed0.log").read_text()
    assert re.search(r"no (CUDA device|GPU) is (available|usable)", log), log[-2000:]


# -- the results of both runs ----------------------------------------------------------------

# Timing is the one thing that legitimately differs between two runs of the same config:
# JSON keys and CSV columns named *time_s (train_time_s, its _mean/_std, per-epoch time_s)
# and elapsed_s. Logs are left out altogether (timings, progress); figures and the rendered
# tables (.png, .svg, .md, .html) are required on both sides but not compared, since they
# draw the numbers compared here (the tables also print the training time).
TIMING = re.compile(r"(?:^|_)time_s(?:_mean|_std)?$|(?:^|_)elapsed_s$")
RENDERED = {".png", ".svg", ".md", ".html"}


def _same(a, b, where):
    """Equal, recursively, leaving out timing keys; floats bit for bit (NaN equals NaN)."""
    import torch

    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            if not TIMING.search(str(key)):
                _same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), where
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _same_csv(a, b, where):
    left, right = pd.read_csv(a), pd.read_csv(b)
    keep = [column for column in left.columns if not TIMING.search(column)]
    if "metric" in left.columns:  # the long table: one row per metric
        left = left[~left["metric"].astype(str).str.contains(TIMING)]
        right = right[~right["metric"].astype(str).str.contains(TIMING)]
    assert list(left.columns) == list(right.columns), where
    pd.testing.assert_frame_equal(
        left[keep].reset_index(drop=True), right[keep].reset_index(drop=True), check_exact=True
    )


def _same_dataset(a, b, where):
    import xarray as xr

    def opened(path):
        if path.suffix == ".zarr":
            return xr.open_zarr(path)
        return xr.open_dataset(path)

    with opened(a) as left, opened(b) as right:
        assert left.identical(right), where  # values, coordinates and attributes


def _same_file(a, b, where):
    import torch

    suffix = a.suffix
    if suffix in (".zarr", ".nc"):
        _same_dataset(a, b, where)
    elif suffix == ".json":
        _same(json.loads(a.read_text()), json.loads(b.read_text()), where)
    elif suffix in (".yaml", ".yml"):
        _same(yaml.safe_load(a.read_text()), yaml.safe_load(b.read_text()), where)
    elif suffix == ".csv":
        _same_csv(a, b, where)
    elif suffix == ".pt":
        _same(torch.load(a, weights_only=True), torch.load(b, weights_only=True), where)
    elif suffix == ".npy":
        assert np.array_equal(np.load(a), np.load(b), equal_nan=True), where
    else:  # a kind of output this test does not know yet: bytes, until it is taught better
        assert a.read_bytes() == b.read_bytes(), f"{where} (compared byte for byte)"


def outputs(workdir):
    """Every result below results/, a zarr store counting as one; logs left out."""
    root = workdir / "results"
    found = set()
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if "logs" in relative.parts or any(p.endswith(".zarr") for p in relative.parts[:-1]):
            continue
        if path.is_file() or path.suffix == ".zarr":
            found.add(relative)
    return found


def test_outputs_equal_a_local_run(slurm_run, local_run):
    ours, theirs = outputs(slurm_run.workdir), outputs(local_run.workdir)
    assert ours == theirs
    compared = Counter()
    for relative in sorted(ours):
        if relative.suffix in RENDERED:
            continue
        _same_file(
            slurm_run.workdir / "results" / relative,
            local_run.workdir / "results" / relative,
            str(relative),
        )
        compared[relative.suffix] += 1
    # every family's numbers were there to compare
    assert compared[".zarr"] >= 5 and compared[".json"] >= 9 and compared[".pt"] >= 9, compared
    print(f"\nresults equal, compared by kind: {dict(compared)}")
