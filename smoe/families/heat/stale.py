"""Outputs on disk that no longer match how they were made, found before any job runs.

Snakemake reruns a job when its inputs are newer or its parameters changed, but not when an
output was edited or replaced by hand: a store whose variables were changed after it was
written, or a region map swapped for another grid, looks up to date. Using them would give
wrong numbers (a store whose diffusivity was edited is scored against the edited stencils)
or a crash deep inside a job, after Snakemake has already deleted that job's old outputs.
The Snakefile calls :func:`stale_outputs` at parse time and refuses to plan, naming the file,
the field and how to regenerate it; nothing is deleted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from smoe.core.errors import InputError
from smoe.families.heat.config import SPLITS


def stale_outputs(config: dict[str, Any]) -> list[str]:
    """One line per existing workflow output that disagrees with itself or with the config."""
    results = Path(config["results"])
    problems = []
    mask_path = results / "data" / "mask.npy"
    if mask_path.is_file():
        problems += _mask_problems(mask_path, config["mask"])
    for split in SPLITS:
        store = results / "data" / "heat" / f"{split}.zarr"
        if store.is_dir():
            problems += _store_problems(store)
    return problems


def _mask_problems(path: Path, mask: dict[str, Any]) -> list[str]:
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        return [f"{path} is not a readable region map ({exc}): remove it to regenerate it"]
    problems = []
    if mask.get("file") is None and values.shape != (mask["height"], mask["width"]):
        problems.append(
            f"{path} is {values.shape[0]}x{values.shape[1]} but mask.height x mask.width is "
            f"{mask['height']}x{mask['width']}: it was replaced after the workflow wrote it; "
            f"remove it (rm {path}) and rerun to regenerate it"
        )
    if values.size and (values.min() < 0 or values.max() >= mask["types"]):
        problems.append(
            f"{path} holds region types {int(values.min())}..{int(values.max())} but "
            f"mask.types is {mask['types']}: remove it (rm {path}) and rerun to regenerate it"
        )
    return problems


def _store_problems(store: Path) -> list[str]:
    from smoe.core.provenance import store_inconsistencies
    from smoe.families.heat.store import open_store

    try:
        ds = open_store(store)
        problems = store_inconsistencies(ds)
    except (InputError, KeyError, ValueError, OSError) as exc:
        problems = [f"it cannot be read ({exc})"]
    return [
        f"store {store}: {problem}; it was changed after the workflow wrote it: remove it "
        f"(rm -r {store}) and rerun to regenerate it"
        for problem in problems
    ]
