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


def script_variable(page: str, name: str):
    """A JSON variable the report page embeds (results, categories, ...)."""
    import json
    import re

    # The embedded libraries declare variables too; the report's own are JSON literals.
    for match in re.finditer(rf"^\s*var {name} = ([\[{{\"].*);\s*$", page, re.M):
        try:
            return json.loads(match.group(1))
        except ValueError:
            continue
    raise AssertionError(f"the report has no JSON variable {name}")


def report_placements(page: str, folder: str) -> dict:
    """Every result of a report page -> (category, subcategory), named by its path below
    ``folder`` (a result elsewhere keeps its whole path, so an exact comparison shows it)."""
    return {
        entry.split(f"{folder}/", 1)[-1]: (category, subcategory)
        for category, subcategories in script_variable(page, "categories").items()
        for subcategory, entries in subcategories.items()
        for entry in entries
    }


def planned_rules(output: str) -> set:
    """The rules a `snakemake -n` plans, from its output."""
    import re

    return set(re.findall(r"^rule (\w+):", output, re.M))


def check_family_report(repo, built, target: str, folder: str, placed: dict) -> None:
    """`snakemake TARGET --report` on a built workdir: the family's results sit where
    ``placed`` says (path below ``folder`` -> (category, subcategory)), every caption renders
    without a docutils message, and every PNG placed stays whole in the report's viewer."""
    import struct
    import tempfile
    from pathlib import Path

    from smoe.core.report.figures import fits_viewer

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "report.html"
        result = run_snakemake(repo, built, target, "--report", str(path))
        assert result.returncode == 0, result.stderr[-3000:]
        page = path.read_text()
    assert report_placements(page, folder) == placed
    for entry in script_variable(page, "results").values():
        caption = entry["caption"]
        assert caption.strip() and "system-message" not in caption
        assert "System Message" not in caption
    for name in placed:
        if name.endswith(".png"):
            data = (built / folder / name).read_bytes()
            assert fits_viewer(*struct.unpack(">II", data[16:24])), name


def rules_when_enabled(repo, workdir, section: str) -> set:
    """The rules `snakemake -n` plans with ``<section>.enabled: true``, after checking that
    without it (config/test.yaml) none of the family's ``<section>``-named rules is planned."""
    off = run_snakemake(repo, workdir, "-n")
    assert off.returncode == 0, off.stderr[-2000:]
    prefix = section.rstrip("s")  # clusters -> cluster_*, gated -> gated_*
    assert not any(rule.startswith(prefix) for rule in planned_rules(off.stdout))
    on = run_snakemake(repo, workdir, "-n", "--config", f"{section}={{enabled: true}}")
    assert on.returncode == 0, on.stderr[-2000:]
    return planned_rules(on.stdout)


def built_workdir(repo, tmp_path_factory, target: str):
    """A fresh workdir in which `snakemake --cores 2 TARGET` (config/test.yaml) succeeded."""
    workdir = tmp_path_factory.mktemp(target)
    result = run_snakemake(repo, workdir, target)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def idx(array, magic: int) -> bytes:
    """An array as an IDX file's bytes (magic number, dimensions, unsigned bytes)."""
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype("uint8").tobytes()


def mnist_folder(folder, n_train=30, n_test=10):
    """A small MNIST folder in the exact IDX format, gzipped as it is downloaded."""
    import gzip

    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as handle:
            handle.write(idx(images, 2051))
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as handle:
            handle.write(idx(labels, 2049))
    return folder
