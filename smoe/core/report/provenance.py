"""Where a report's numbers came from: the resolved config and the software that ran it.

A reader who receives a report must be able to tell which config produced it (every default
filled in, exactly as the workflow validated it) and with which versions of the packages
whose behaviour the numbers depend on. :func:`provenance_page` renders both as one
standalone HTML page for `snakemake --report`; the YAML and a JSON record of the versions are
written beside it for scripts.
"""

from __future__ import annotations

import html
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from smoe.core.atomic import write_text_atomic
from smoe.core.report.tables import STYLE

PACKAGES = (
    "smoe",
    "snakemake",
    "torch",
    "numpy",
    "scipy",
    "pandas",
    "xarray",
    "zarr",
    "dask",
    "netCDF4",
    "matplotlib",
    "scikit-learn",
)
"""The distributions whose versions can change a number in the report."""


def git_revision(folder: Path) -> str | None:
    """``<commit>`` or ``<commit> (modified)`` when ``folder`` is in a git checkout with git
    installed; None otherwise (an installed package, no git)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    modified = " (modified)" if status.returncode == 0 and status.stdout.strip() else ""
    return commit.stdout.strip() + modified


def software_versions() -> dict[str, Any]:
    """Python, platform, the versions of :data:`PACKAGES` (None when not installed), the
    workflow's git revision, and whether PyTorch sees a GPU."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    record: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "workflow_git": git_revision(Path(__file__).resolve().parents[3]),
    }
    try:
        import torch

        record["torch_cuda"] = torch.version.cuda
        record["cuda_available"] = bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return record


def config_yaml(config: dict[str, Any]) -> str:
    """The config as YAML in the order the workflow holds it (defaults included)."""
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=100)


def provenance_page(config: dict[str, Any], versions: dict[str, Any]) -> str:
    """One HTML page: software versions as a table, then the resolved config."""
    e = html.escape
    rows = [
        ("Python", versions.get("python")),
        ("platform", versions.get("platform")),
        ("workflow git revision", versions.get("workflow_git") or "not a git checkout"),
    ]
    if "torch_cuda" in versions:
        cuda = versions.get("torch_cuda") or "none (CPU build)"
        rows += [
            ("PyTorch CUDA build", cuda),
            ("GPU visible when the report was made", versions.get("cuda_available")),
        ]
    rows += [
        (name, version or "not installed") for name, version in versions.get("packages", {}).items()
    ]
    table = "\n".join(
        f'<tr><td class="label">{e(str(name))}</td><td class="label">{e(str(value))}</td></tr>'
        for name, value in rows
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>Configuration and versions</title>\n<style>{STYLE}\n"
        "pre { background: #f5f7fa; border: 1px solid #e4e7eb; padding: .75rem 1rem;"
        " font-size: 13px; line-height: 1.35; overflow-x: auto; }\n</style>\n</head>\n<body>\n"
        "<h1>Configuration and software versions</h1>\n"
        '<p class="lead">The config every result of this report was made from, as the workflow '
        "validated it (schema defaults filled in), and the software that ran the workflow. "
        "Rerunning the workflow with this config and these versions regenerates the report; "
        "the same config is in <code>config.yaml</code> beside this page.</p>\n"
        "<h2>Software</h2>\n<table>\n<thead><tr>"
        '<th class="label">component</th><th class="label">version</th></tr></thead>\n'
        f"<tbody>\n{table}\n</tbody>\n</table>\n"
        f"<h2>Resolved config</h2>\n<pre>{e(config_yaml(config))}</pre>\n"
        "</body>\n</html>\n"
    )


def write_provenance(config: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """``out`` (the HTML page), and ``config.yaml`` and ``versions.json`` beside it."""
    out = Path(out)
    versions = software_versions()
    paths = {
        "html": out,
        "config": out.with_name("config.yaml"),
        "versions": out.with_name("versions.json"),
    }
    write_text_atomic(paths["config"], config_yaml(config))
    write_text_atomic(paths["versions"], json.dumps(versions, indent=2) + "\n")
    write_text_atomic(paths["html"], provenance_page(config, versions))
    return paths
