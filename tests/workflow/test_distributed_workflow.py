"""The workflow's data stage on a running dask scheduler: `snakemake --config
'compute={scheduler: tcp://HOST:PORT}'` on the tiny config, data targets only."""

import numpy as np
import pytest
from snakemake_runs import run_snakemake

from smoe.config import load_config
from smoe.families.heat.config import Config
from smoe.families.heat.store import open_store, simulate_split

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.slow

SPLITS = ("train", "val", "test")


def test_data_stage_on_a_dask_cluster(repo, tmp_path):
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster:
        address = cluster.scheduler_address
        targets = [f"results/test/data/heat/{split}.zarr/zarr.json" for split in SPLITS]
        result = run_snakemake(
            repo, tmp_path, *targets, "--config", f"compute={{scheduler: {address}}}"
        )
        assert result.returncode == 0, result.stderr[-3000:]
        dashboard = cluster.dashboard_link
    logs = tmp_path / "results" / "test" / "logs" / "data"
    for split in SPLITS:
        log = (logs / f"simulate_{split}.log").read_text()
        assert f"dask scheduler {address}: 2 worker(s)" in log and dashboard in log, log
    # The field is the one a local synchronous run computes.
    typed = Config.from_dict(load_config(repo / "config" / "test.yaml"))
    mask = np.load(tmp_path / "results" / "test" / "data" / "mask.npy")
    local = simulate_split(
        mask,
        typed.heat,
        seed=typed.splits["train"].seed,
        runs=typed.splits["train"].runs,
        out=tmp_path / "local.zarr",
        runs_per_chunk=typed.runs_per_chunk,
        scheduler="synchronous",
        progress=False,
    )
    ours = open_store(tmp_path / "results" / "test" / "data" / "heat" / "train.zarr")
    np.testing.assert_array_equal(ours["u"].values, open_store(local)["u"].values)
    # Where the tasks ran changes no value, so switching back to a local scheduler on the
    # finished folder plans nothing.
    again = run_snakemake(
        repo, tmp_path, *targets, "-n", "--config", "compute={scheduler: threads}"
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-2000:]
