"""Paths, targets and job parameters computed from the validated config.

Rules stay declarative: every value they need comes from a function here, so rules hold no
lambdas and the config is read in one place.
"""

import sys

sys.path.insert(0, workflow.basedir)  # the smoe package beside the Snakefile

from smoe.config import SPLITS, Config, validate_config
from smoe.data.store import task_runs
from smoe.errors import InputError

try:
    _validated = validate_config(config)
except InputError as _error:
    raise WorkflowError(str(_error)) from None
config.clear()
config.update(_validated)
CFG = Config.from_dict(config)
RESULTS = str(CFG.results)
SMOE_ENV = "../../envs/smoe.yaml"


wildcard_constraints:
    split="|".join(SPLITS),


def mask_file():
    return f"{RESULTS}/data/mask.npy"


def store_file(split):
    return f"{RESULTS}/data/heat/{split}.zarr"


def netcdf_file(split):
    return f"{RESULTS}/data/heat/{split}.nc"


def data_targets():
    """The mask, its picture and every split (plus netCDF copies when asked for)."""
    targets = [mask_file(), f"{RESULTS}/data/mask.png"]
    targets += [store_file(split) for split in SPLITS]
    if CFG.export_netcdf:
        targets += [netcdf_file(split) for split in SPLITS]
    return targets


def all_targets():
    return data_targets()


def mask_inputs(wildcards):
    return [CFG.mask.file] if CFG.mask.file else []


def mask_args(wildcards):
    """Options of `smoe mask`: copy and check a given map, or generate one."""
    m = CFG.mask
    if m.file:
        return f"--from '{m.file}' --types {m.types}"
    return f"--height {m.height} --width {m.width} --types {m.types} --seed {m.seed}"


def simulate_args(wildcards):
    """Options of `smoe simulate` for one split, straight from the config."""
    heat = CFG.heat
    split = CFG.splits[wildcards.split]
    args = [
        f"--split {wildcards.split}",
        f"--runs {split.runs}",
        f"--seed {split.seed}",
        f"--steps {heat.steps}",
        "--diffusivity " + " ".join(repr(a) for a in heat.diffusivity),
        f"--boundary {heat.boundary}",
        f"--init {heat.init}",
        f"--compression {CFG.compression}",
        f"--scheduler {CFG.scheduler}",
    ]
    if heat.init_ranges:
        args += [f"--init-range {low!r} {high!r}" for low, high in heat.init_ranges]
    if heat.negative_sources:
        args.append("--negative-sources")
    if heat.heat_rate:
        args.append(f"--heat-rate {heat.heat_rate}")
    if heat.clip:
        args.append(f"--clip {heat.clip[0]!r} {heat.clip[1]!r}")
    if CFG.runs_per_chunk:
        args.append(f"--runs-per-chunk {CFG.runs_per_chunk}")
    return " ".join(args)


def _grid_cells():
    if CFG.mask.file:
        import numpy as np
        from smoe.data.mask import load_mask

        return int(np.asarray(load_mask(CFG.mask.file)).size)
    return CFG.mask.height * CFG.mask.width


def simulate_mem_mb(wildcards, threads):
    """Memory of one simulation job: one block of frames per worker, plus headroom."""
    runs = CFG.splits[wildcards.split].runs
    frames = CFG.heat.steps + 1
    run_mb = frames * _grid_cells() * 4 / 2**20
    per_chunk = CFG.runs_per_chunk or max(1, int(8 * 2**20 // (run_mb * 2**20)))
    per_task = task_runs(runs, min(per_chunk, runs), threads)
    return int(500 + 2.5 * threads * per_task * run_mb)


def simulate_runtime(wildcards):
    """Minutes for a cluster job: about 10 s per 100 runs of 64x64 on one core, times 10."""
    updates = CFG.splits[wildcards.split].runs * CFG.heat.steps * _grid_cells()
    return max(10, int(updates / 4.1e8 * 10))
