"""What the Snakefile asks of the running Snakemake while it plans: which executor the run
targets and how ``train.device: cuda`` without a GPU here is treated. Kept out of the rule
files so they stay declarative and this stays testable."""

from __future__ import annotations

import os
import sys

from smoe.core.config import gpu_check_mode
from smoe.core.zarr_store import STORE_HEAD


def planned_executor() -> str | None:
    """The executor this run targets: --executor, or a profile's `executor:` (None when
    Snakemake runs through its Python API).

    Snakemake 9 sets workflow.executor_plugin only after the Snakefile is parsed (and to the
    dry-run executor under -n), so the command line Snakemake parsed, profiles included, is
    read from the frame of snakemake.cli.args_to_api, which parses the Snakefile.
    """
    frame = sys._getframe()
    while frame is not None:
        code = frame.f_code
        if code.co_name == "args_to_api" and code.co_filename.endswith(
            os.path.join("snakemake", "cli.py")
        ):
            return getattr(frame.f_locals.get("args"), "executor", None)
        frame = frame.f_back
    return None


def gpu_check(exec_mode: str, executor: str | None) -> str:
    """train.device: cuda without a GPU here is an error for a local run, a warning when the
    executor sends jobs elsewhere, and not checked again inside a job (``exec_mode`` other
    than DEFAULT: the main process checked). SMOE_GPU_CHECK=local|cluster|skip overrides."""
    if exec_mode != "DEFAULT":
        return "skip"
    if executor in (None, "local", "dryrun", "touch"):
        return gpu_check_mode("local")
    try:
        from snakemake_interface_executor_plugins.registry import ExecutorPluginRegistry

        plugin = ExecutorPluginRegistry().get_plugin(executor)
        local = not plugin.common_settings.non_local_exec
    except Exception:  # an unknown plugin: Snakemake itself refuses it after parsing
        local = False
    return gpu_check_mode("local" if local else "cluster")


def store_head(folder: str) -> str:
    """The file a rule declares for the zarr store ``folder``: its root metadata, written
    last (the store is renamed into place whole), so that Snakemake tracks the store
    without writing a timestamp file into it."""
    return f"{folder}/{STORE_HEAD}"
