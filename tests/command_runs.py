"""How the command-line tests call `smoe` (a real subprocess, never a mock) and take a
snapshot of a folder, to show that a refused command changed nothing."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path


def smoe(work: Path, *args: str, **popen) -> subprocess.CompletedProcess:
    """`python -m smoe ARGS` in ``work``, without SMOE_DEBUG (so errors are one line)."""
    env = {k: v for k, v in os.environ.items() if k != "SMOE_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "smoe", *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        **popen,
    )


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root``: a file's SHA-256 (size and time if this user may not read
    it), or 'folder'."""
    tree = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_dir():
            tree[key] = "folder"
            continue
        try:
            tree[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        except PermissionError:
            stat = path.stat()
            tree[key] = f"unreadable, {stat.st_size} bytes, modified {stat.st_mtime_ns}"
    return tree


def assert_refused(work: Path, verb: str, args, expect: str, run=smoe) -> str:
    """Run ``smoe ARGS`` (through ``run``): one line `smoe VERB: error: ...` holding
    ``expect``, status 2, no traceback, the workspace unchanged. Returns the line."""
    before = snapshot(work)
    result = run(work, *args)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith(f"smoe {verb}: error: "), line
    assert expect in line, line
    assert snapshot(work) == before
    return line


def write_results(folder: Path, results, name) -> list[Path]:
    """Each result dict as a JSON file in ``folder``, named ``<index>_<name(result)>.json``;
    the paths, in order."""
    import json

    paths = []
    for index, values in enumerate(results):
        path = folder / f"{index:02d}_{name(values)}.json"
        path.write_text(json.dumps(values))
        paths.append(path)
    return paths
