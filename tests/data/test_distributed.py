"""The simulation on a running dask.distributed scheduler (``--scheduler tcp://HOST:PORT``,
config key ``compute.scheduler``): the same store as the synchronous scheduler's, bit for bit,
the scheduler's workers and dashboard in the log, and a clear, quick error when no scheduler
answers."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from smoe.config import validate_config
from smoe.core.errors import InputError
from smoe.families.heat.choices import scheduler_address

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.slow

SIMULATE = ["--runs", "7", "--seed", "9", "--steps", "8", "--diffusivity", "0.0025", "0.025"]
SIMULATE += ["0.25", "--runs-per-chunk", "2", "--workers", "2", "--no-progress"]


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded worker processes and a dashboard on a free port."""
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as local:
        yield local


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory, small_mask):
    path = tmp_path_factory.mktemp("mask") / "mask.npy"
    np.save(path, small_mask)
    return path


def simulate(mask: Path, out: Path, scheduler: str, cwd: Path) -> subprocess.CompletedProcess:
    """`smoe simulate` as the workflow's rule runs it; ``out`` relative to ``cwd`` (a remote
    worker's working directory is not the job's)."""
    command = [sys.executable, "-m", "smoe", "simulate", "--mask", str(mask), *SIMULATE]
    command += ["--scheduler", scheduler, "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_same_store(ours: Path, reference: Path) -> None:
    """Array for array and attribute for attribute, then every file byte for byte."""
    a, b = zarr.open_group(ours, mode="r"), zarr.open_group(reference, mode="r")
    assert dict(a.attrs) == dict(b.attrs)
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    for name in b.array_keys():
        x, y = a[name], b[name]
        assert (x.shape, x.dtype, x.chunks) == (y.shape, y.dtype, y.chunks), name
        assert dict(x.attrs) == dict(y.attrs), name
        assert np.array_equal(x[...], y[...], equal_nan=True), name
    files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert sorted(p.relative_to(ours) for p in ours.rglob("*") if p.is_file()) == files
    for file in files:
        assert (ours / file).read_bytes() == (reference / file).read_bytes(), file


def test_store_on_a_cluster_is_the_synchronous_store(tmp_path, mask_file, cluster):
    (tmp_path / "sync").mkdir()
    (tmp_path / "cluster").mkdir()
    reference = simulate(mask_file, Path("val.zarr"), "synchronous", tmp_path / "sync")
    assert reference.returncode == 0, reference.stderr
    address = cluster.scheduler_address
    result = simulate(mask_file, Path("val.zarr"), address, tmp_path / "cluster")
    assert result.returncode == 0, result.stderr
    assert_same_store(tmp_path / "cluster" / "val.zarr", tmp_path / "sync" / "val.zarr")
    # The log names the scheduler, its workers and its dashboard.
    assert f"dask scheduler {address}: 2 worker(s)" in result.stderr
    assert f"dashboard {cluster.dashboard_link}" in result.stderr
    # The job closed its client only: the cluster keeps its workers.
    assert cluster.status.name == "running" and len(cluster.scheduler_info["workers"]) == 2


def test_unreachable_scheduler_fails_at_once_naming_key_and_address(tmp_path, mask_file):
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    result = simulate(mask_file, Path("val.zarr"), address, tmp_path)
    assert time.monotonic() - start < 10
    assert result.returncode == 2
    assert "config key 'compute.scheduler'" in result.stderr and address in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("val.zarr*"))  # nothing written, not even a .partial


def test_silent_server_is_not_taken_for_a_scheduler(tmp_path):
    """Something listening that never answers dask's handshake fails within the timeout."""
    from smoe.families.heat.store import connect_scheduler

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(InputError, match=r"compute\.scheduler.*no dask scheduler answered"):
            connect_scheduler(address, timeout=1)
        assert time.monotonic() - start < 5


GOOD = ["tcp://127.0.0.1:8786", "tcp://node12.cluster:8786", "tcp://[::1]:8786", "tcp://h_1:1/"]
BAD = ["tcp://node12", "node12:8786", "tls://node12:8786", "tcp://:8786", "tcp://a b:1", "local"]


@pytest.mark.parametrize("value", GOOD + BAD)
def test_config_checks_the_address_syntax_only(repo, value):
    config = yaml.safe_load((repo / "config" / "test.yaml").read_text())
    config["compute"] = {"scheduler": value}
    if value in GOOD:
        assert validate_config(config)["compute"]["scheduler"] == value  # nothing contacted
        assert scheduler_address(value)[1] in (8786, 1)
    else:
        with pytest.raises(InputError, match=r"config key 'compute\.scheduler'.*tcp://HOST:PORT"):
            validate_config(config)
        with pytest.raises(ValueError, match="tcp://HOST:PORT"):
            scheduler_address(value)
