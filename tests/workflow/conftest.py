"""The tiny config built once per test session (`snakemake --cores 2` on config/test.yaml)
for every workflow test module that only reads its outputs."""

import pytest
from snakemake_runs import run_snakemake


@pytest.fixture(scope="session")
def built_workflow(repo, tmp_path_factory):
    """A workdir holding every output of the tiny config. Tests must not change it."""
    workdir = tmp_path_factory.mktemp("workflow")
    result = run_snakemake(repo, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir
