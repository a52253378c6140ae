"""How the workflow tests call Snakemake (a real `python -m snakemake`, never a mock)."""

import os
import subprocess
import sys


def run_snakemake(repo, workdir, *args, configfile=None, cores=2, env=None):
    """`python -m snakemake ARGS` on the repository's Snakefile in ``workdir``; targets and
    flags go before --configfile, which takes several values."""
    command = [
        sys.executable,
        "-m",
        "snakemake",
        *args,
        "--snakefile",
        str(repo / "Snakefile"),
        "--directory",
        str(workdir),
        "--cores",
        str(cores),
        "--configfile",
        str(configfile or repo / "config" / "test.yaml"),
    ]
    environment = {k: v for k, v in os.environ.items() if k != "SMOE_GPU_CHECK"}
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=workdir,
        env={**environment, **(env or {})},
    )


def snapshot(folder):
    """Every file's bytes and every entry's mtime under ``folder``: equal before and after
    a refused run when the run changed nothing."""
    state = {}
    for path in sorted(folder.rglob("*")):
        content = path.read_bytes() if path.is_file() else None
        state[str(path.relative_to(folder))] = (content, path.stat().st_mtime_ns)
    return state


def tiny_config(repo):
    """config/test.yaml as a mapping, for a test to edit and write back."""
    import yaml

    return yaml.safe_load((repo / "config" / "test.yaml").read_text())
