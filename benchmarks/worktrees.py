"""The baseline revision a benchmark compares with, checked out once as a git worktree."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def baseline_tree(work: Path, revision: str) -> Path:
    """A detached worktree of ``revision`` under ``work`` (made on first use, then reused);
    run its package through ``PYTHONPATH`` so both revisions see the same machine."""
    tree = work / f"baseline-{revision}"
    if not tree.exists():
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), revision],
            check=True,
            capture_output=True,
        )
    return tree
