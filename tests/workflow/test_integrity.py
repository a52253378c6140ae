"""Damaged inputs refused before any job, through a real Snakemake on the tiny config.

Snakemake deletes a job's old outputs when the job starts, so a damaged input refused inside
the job used to cost them. Each test damages one file of a copy of the built workflow (or of
a small MNIST folder) and runs Snakemake as a user would: the run stops before any job,
naming the file and how to regenerate it, and every file under results/ keeps its bytes and
times. An unreadable last.pt is said on the console when its training starts from scratch.
"""

import gzip
import json
import os
import re
import shutil

import numpy as np
import pytest
import yaml
from snakemake_runs import idx, mnist_folder, run_snakemake, snapshot, tiny_config

pytestmark = pytest.mark.slow

HEAT = "results/test/data/heat"
SMOE = "results/test/models/smoe/seed0"
GATED = "results/test/gated"


@pytest.fixture(scope="module")
def pristine(built_workflow):
    """The tiny config's finished workflow (built once per session); tests change copies."""
    return built_workflow


def refused(repo, work, *args, expect, configfile=None) -> str:
    """Run Snakemake in ``work``: it must stop with every line of ``expect`` in its output,
    no job started, and results/ unchanged, byte for byte and time for time."""
    before = snapshot(work / "results")
    result = run_snakemake(repo, work, *args, configfile=configfile)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    for line in expect:
        assert line in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert not re.search(r"^(local)?rule \w+:", out, re.M), out[-3000:]  # no job started
    assert snapshot(work / "results") == before
    return out


def damage_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("damaged input ")]


def flip_byte(path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_truncated_chunk_is_refused_before_the_netcdf_export_is_deleted(repo, work):
    chunk = work / HEAT / "train.zarr" / "u" / "c" / "1" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:1000])
    out = refused(
        repo,
        work,
        "--forcerun",
        "export_netcdf",
        expect=[
            f"damaged input {HEAT}/train.zarr: chunk u/c/1/0/0/0 is 1000 bytes, but ",
            "no job was started and nothing was deleted",
            f"rm -r {HEAT}/train.zarr, then rerun snakemake",
        ],
    )
    assert len(damage_lines(out)) == 1
    assert (work / HEAT / "train.nc").is_file()


def test_a_chunk_with_other_bytes_of_the_right_size_is_refused(repo, work):
    chunk = work / HEAT / "test.zarr" / "u" / "c" / "0" / "0" / "0" / "0"
    size = chunk.stat().st_size
    flip_byte(chunk, size // 2)
    assert chunk.stat().st_size == size
    refused(
        repo,
        work,
        "--forcerun",
        "export_netcdf",
        expect=[
            f"damaged input {HEAT}/test.zarr: chunk u/c/0/0/0/0 has other bytes than were "
            "written (its CRC-32 differs)",
            f"rm -r {HEAT}/test.zarr, then rerun snakemake",
        ],
    )


def test_a_truncated_best_checkpoint_is_refused_before_its_metrics_are_deleted(repo, work):
    best = work / SMOE / "best.pt"
    best.write_bytes(best.read_bytes()[:-100])
    os.utime(best)
    out = refused(
        repo,
        work,
        expect=[
            f"damaged input {SMOE}/best.pt: not a readable zip archive as torch.save writes",
            f"rerun snakemake with --forcerun {SMOE}/best.pt (its job runs again",
        ],
    )
    assert len(damage_lines(out)) == 1
    assert (work / "results/test/metrics/smoe/seed0.json").is_file()
    assert (work / "results/test/predictions/smoe/seed0.nc").is_file()


def test_a_metrics_file_that_is_not_json_is_refused_before_the_tables_are_deleted(repo, work):
    metrics = work / "results/test/metrics/cnn/seed0.json"
    metrics.write_text("this is not JSON\n")
    refused(
        repo,
        work,
        expect=[
            "damaged input results/test/metrics/cnn/seed0.json: not JSON (",
            "rerun snakemake with --forcerun results/test/metrics/cnn/seed0.json (its job",
        ],
    )
    assert (work / "results/test/tables/summary.csv").is_file()


def test_an_unreadable_last_checkpoint_is_said_on_the_console(repo, work):
    last = work / SMOE / "last.pt"
    last.write_bytes(last.read_bytes()[:500])
    target = f"{SMOE}/best.pt"
    result = run_snakemake(repo, work, target, "--forcerun", target)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    warned = [line for line in out.splitlines() if "cannot be resumed" in line]
    assert len(warned) == 1, out[-3000:]
    assert warned[0].startswith(f"warning: {SMOE}/last.pt cannot be resumed (not a readable zip")
    assert warned[0].endswith(f"the training of {SMOE} (rule train) starts from scratch")
    summary = json.loads((work / SMOE / "train.json").read_text())
    assert "last.pt" in summary["fresh_start_reason"]
    log = (work / "results/test/logs/train/smoe_seed0.log").read_text()
    assert "not resuming" in log


@pytest.fixture(scope="module")
def mnist_built(repo, tmp_path_factory):
    """The gated stores converted from a small MNIST folder (the only gated jobs run)."""
    root = tmp_path_factory.mktemp("mnist")
    folder = mnist_folder(root / "mnist")
    config = tiny_config(repo)
    config["gated"]["data"] = {"dataset": "mnist", "folder": str(folder), "val_fraction": 0.2}
    (root / "mnist.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = run_snakemake(repo, root, *stores(), configfile=root / "mnist.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def stores() -> list[str]:
    return [f"{GATED}/data/{split}.zarr/zarr.json" for split in ("train", "val", "test")]


@pytest.fixture
def mnist_work(mnist_built, tmp_path):
    """A copy of :func:`mnist_built` whose config points at the copy's own MNIST folder."""
    work = tmp_path / "work"
    shutil.copytree(mnist_built, work)
    config = yaml.safe_load((work / "mnist.yaml").read_text())
    config["gated"]["data"]["folder"] = str(work / "mnist")
    (work / "mnist.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return work


def test_an_idx_label_out_of_range_is_refused_by_a_dry_run_and_a_real_run(repo, mnist_work):
    labels = mnist_work / "mnist" / "train-labels-idx1-ubyte.gz"
    with gzip.open(labels, "wb") as handle:
        handle.write(idx(np.array([12] + [3] * 29), 2049))
    expect = [
        f"config key 'gated.data.folder': file '{labels}': labels must lie in 0..9, found 3..12"
    ]
    configfile = mnist_work / "mnist.yaml"
    refused(repo, mnist_work, "-n", *stores(), expect=expect, configfile=configfile)
    refused(repo, mnist_work, *stores(), expect=expect, configfile=configfile)


def test_a_source_file_whose_gzip_body_is_damaged_is_refused_before_the_stores_go(repo, mnist_work):
    images = mnist_work / "mnist" / "train-images-idx3-ubyte.gz"
    flip_byte(images, images.stat().st_size // 2)  # the header and the size still agree
    configfile = mnist_work / "mnist.yaml"
    dry = run_snakemake(repo, mnist_work, "-n", *stores(), configfile=configfile)
    assert dry.returncode == 0, dry.stderr[-3000:]  # only a full read sees it
    out = refused(
        repo,
        mnist_work,
        *stores(),
        configfile=configfile,
        expect=[
            f"damaged input {images}: file '{images}' is not a readable gzip file",
            "no job was started and nothing was deleted: replace it with a good copy, then "
            "rerun snakemake",
        ],
    )
    assert len(damage_lines(out)) == 1
