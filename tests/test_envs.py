"""envs/smoe.yaml, the conda environment of `--sdm conda` jobs, holds every runtime
dependency pyproject.toml declares, with the same lower bound: smoe.post-deploy.sh installs
the package with --no-deps, so a dependency missing there fails a job, not a test."""

import re
import tomllib

import yaml
from packaging.requirements import Requirement

CONDA_NAMES = {"torch": "pytorch", "netCDF4": "netcdf4"}
"""pip name -> conda-forge name where they differ."""
EXTRAS = {"distributed": "distributed", "diagnostics": "bokeh"}
"""dask's extras -> the conda packages they are (its `array` extra is numpy, listed anyway)."""
HOST_ONLY = {"snakemake": "jobs run `smoe ...`; only the planning process runs Snakemake"}
"""pyproject dependencies a job does not import, and why."""


def requirement(text):
    """(name, lower bound such as '>=2.3' or None, extras) of a pip requirement."""
    parsed = Requirement(text)
    lower = [f">={spec.version}" for spec in parsed.specifier if spec.operator == ">="]
    return parsed.name, (lower[0] if lower else None), sorted(parsed.extras)


def conda_packages(repo):
    env = yaml.safe_load((repo / "envs" / "smoe.yaml").read_text())
    packages = {}
    for entry in env["dependencies"]:
        if isinstance(entry, str):
            name, bound = re.match(r"^([A-Za-z0-9_.\-]+)\s*(>=\S+|=\S+)?", entry).groups()
            packages[name] = bound
    return packages


def test_the_conda_environment_matches_pyproject(repo):
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    conda = conda_packages(repo)
    missing, different = [], []
    for text in project["dependencies"]:
        name, bound, extras = requirement(text)
        if name in HOST_ONLY:
            continue
        conda_name = CONDA_NAMES.get(name, name)
        if conda_name not in conda:
            missing.append(f"{conda_name} (pyproject: {text})")
        elif conda[conda_name] != bound:
            different.append(f"{conda_name}: conda {conda[conda_name]}, pyproject {bound}")
        missing += [
            f"{EXTRAS[extra]} (extra {extra} of {name})"
            for extra in extras
            if extra in EXTRAS and EXTRAS[extra] not in conda
        ]
    assert not missing, f"envs/smoe.yaml lacks {missing}"
    assert not different, f"lower bounds differ: {different}"
    python = re.sub(r"[^\d.]", "", project["requires-python"])
    assert conda["python"] == f"={python}"


def test_the_job_environment_installs_the_package_without_its_dependencies(repo):
    script = (repo / "envs" / "smoe.post-deploy.sh").read_text()
    assert "--no-deps" in script  # so every dependency must be in envs/smoe.yaml
