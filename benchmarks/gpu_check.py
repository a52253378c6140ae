"""The prepared GPU check: what a GPU has to show for this project, in one call of under 8
minutes on one H100/H200-class card, written to one JSON file.

1. ``cuda_tests``: the tests that need CUDA (:data:`CUDA_TESTS`), run by pytest in a
   subprocess; passed, failed, errors and skipped counts.
2. ``precision_agreement``: the paper's heat SMoE (``config/paper.yaml``'s ``smoe``: latent
   gate, 3 experts, top-1, RC loss, damping; its recipe) trained for a few hundred steps
   from seed 0 on the same small generated data in fp32, bf16 and fp16; whether the final
   layer's selections on a fixed validation batch equal fp32's and whether the final
   validation metrics are within :data:`TOLERANCE` of fp32's.
3. ``epochs_per_second``: a few epochs of the quick (``config/config.yaml``) and the paper
   (``config/paper.yaml``) SMoE recipes on generated data of each recipe's size, the first
   epoch (kernel and cache warm-up) left out.
4. ``time_to_100``: the paper recipe trained as configured until validation prcntclose1.0
   reaches 100 %, capped so the whole check stays inside its budget.

Each section is written to the JSON as soon as it ends (a killed run keeps what it did), and
a section that raises is recorded under ``errors`` while the others still run. Exit status:
0 when every section ran and no test failed, 1 otherwise, 2 without a CUDA device (unless
``--dry-run``).

``--dry-run`` runs the same code on the CPU with tiny sizes (a 12 x 10 map, 6 runs of 8
steps, 2-3 epochs, a 3 s cap): the CUDA tests skip (``"skipped": "no CUDA device"``; on a
machine with one they run with CUDA hidden), bf16 and fp16 are not trained (autocast runs on
CUDA only), and the JSON has the same keys. The test suite runs it (tests/test_gpu_check.py).

    bash benchmarks/gpu_check.sh [--out gpu_check.json] [--dry-run] [--cap-s 150]
        [--budget-s 420] [--work DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from smoe.config import load_config
from smoe.core.config import ModelSpec
from smoe.families.heat.config import Config, model_spec
from smoe.families.heat.dataset import loader
from smoe.families.heat.mask import generate_mask
from smoe.families.heat.store import simulate_split
from smoe.families.heat.task import Trainer

ROOT = Path(__file__).resolve().parents[1]

CUDA_TESTS = (
    "tests/train/test_cuda.py",
    "tests/train/test_cluster_train.py::"
    "test_the_moe_trains_and_evaluates_on_cuda_with_noise_on_the_device",
    "tests/models/test_routing.py::"
    "test_a_loss_scale_changes_no_selection_damping_or_gradient[True-cuda]",
    "tests/models/test_cluster_models.py::"
    "test_the_noise_is_drawn_on_the_scores_device_from_the_generator",
)
"""Every test with a CUDA-only part: the CUDA module and the CUDA cases of other modules."""

NO_CUDA = "no CUDA device"
PRECISIONS = ("fp32", "bf16", "fp16")
TOLERANCE = {"prcntclose1.0_points": 1.0, "mse_relative": 0.1}
"""How far a mixed-precision run's final validation metrics may be from fp32's: prcntclose1.0
within 1 percentage point, mse within 10 % of fp32's."""
EVALUATION_BATCH = 32
"""Validation pairs (the first ones of the split) whose routing the precisions compare."""
SEED = 0
TINY_MASK_SEED = 3
"""A 12 x 10 map with 3 types from this seed has every type (the tests' small map)."""
RESERVE_S = 20.0
"""Budget kept back from the time-to-100 cap: the capped run's data load and model build,
and writing the JSON."""


@dataclass(frozen=True)
class Data:
    """One generated data set: a config's map, physics and split seeds, with these sizes.
    ``grid`` replaces the config's map by a tiny generated one (dry runs)."""

    config: str
    train_runs: int
    val_runs: int
    steps: int
    grid: tuple[int, int] | None = None

    def folder_name(self) -> str:
        grid = "x".join(map(str, self.grid)) if self.grid else "map"
        return f"{Path(self.config).stem}-{self.train_runs}-{self.val_runs}-{self.steps}-{grid}"


@dataclass(frozen=True)
class Plan:
    """Sizes of one check: the GPU's (:data:`FULL`) or the CPU dry run's (:data:`DRY`)."""

    device: str
    precision_data: Data
    precision_epochs: int
    quick_data: Data
    paper_data: Data
    rate_epochs: int
    cap_s: float


FULL = Plan(
    device="cuda",
    # 1000 pairs: 32 steps of 32 per epoch, 320 steps in 10 epochs
    precision_data=Data("config/paper.yaml", train_runs=40, val_runs=4, steps=25),
    precision_epochs=10,
    quick_data=Data("config/config.yaml", train_runs=100, val_runs=10, steps=100),
    paper_data=Data("config/paper.yaml", train_runs=1000, val_runs=20, steps=100),
    rate_epochs=3,
    cap_s=150.0,
)
TINY = Data("config/paper.yaml", train_runs=6, val_runs=2, steps=8, grid=(12, 10))
DRY = Plan(
    device="cpu",
    precision_data=TINY,
    precision_epochs=3,
    quick_data=dataclasses.replace(TINY, config="config/config.yaml"),
    paper_data=TINY,
    rate_epochs=2,
    cap_s=3.0,
)


class Deadline:
    """The check's time budget, counted from its start."""

    def __init__(self, budget_s: float) -> None:
        self.end = time.monotonic() + budget_s

    def left(self) -> float:
        return self.end - time.monotonic()


def make_stores(data: Data, work: Path) -> dict[str, Path]:
    """Train and validation stores of ``data``, simulated by the workflow's own writer once
    per ``work`` folder (sections with the same data share them)."""
    config = Config.from_dict(load_config(ROOT / data.config))
    types = config.mask.types
    if data.grid:
        mask = generate_mask(*data.grid, types, TINY_MASK_SEED)
    else:
        mask = generate_mask(config.mask.height, config.mask.width, types, config.mask.seed)
    params = dataclasses.replace(config.heat, steps=data.steps)
    folder = work / data.folder_name()
    stores = {}
    for split, runs in (("train", data.train_runs), ("val", data.val_runs)):
        path = folder / f"{split}.zarr"
        if not (path / "zarr.json").exists():
            simulate_split(
                mask,
                params,
                config.splits[split].seed,
                runs,
                path,
                split=split,
                compression=config.compression,
                workers=os.cpu_count() or 1,
                progress=False,
            )
        stores[split] = path
    return stores


def recipe_spec(config: str, device: str, **train: Any) -> ModelSpec:
    """The ``smoe`` model of ``config`` with its recipe, sent to ``device``, with ``train``
    overrides. Threads are left to torch: the quick recipe's single thread is for two
    trainings side by side on a 2-core machine, not for a timing."""
    spec = model_spec(load_config(ROOT / config), "smoe")
    spec.train.update(device=device, threads=None, **train)
    return spec


class CappedTrainer(Trainer):
    """``smoe train``'s heat trainer, stopped before an epoch that would end past ``cap_s``
    of training time (the last epoch's duration as the estimate), so a check that has to
    fit its budget still ends with a ``best.pt`` and a summary."""

    def __init__(self, *args: Any, cap_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cap_s = cap_s

    def _stop_reason(self, value: float) -> str:
        reason = super()._stop_reason(value)
        ends = [0.0, *(row["time_s"] for row in self.state.history)]
        if not reason and self.state.elapsed_s + (ends[-1] - ends[-2]) > self.cap_s:
            return f"time cap {self.cap_s:.0f} s"
        return reason


def trainer_for(spec: ModelSpec, stores: dict[str, Path], out: Path) -> Trainer:
    """``smoe train``'s heat trainer of ``spec`` on ``stores`` from :data:`SEED`."""
    return Trainer(spec, stores["train"], stores["val"], SEED, out, progress=False)


def steps_per_epoch(trainer: Trainer) -> int:
    batch = trainer.settings["batch_size"]
    return -(-len(trainer.train_set) // batch)


def on_cpu_because() -> str:
    """Why a check runs on the CPU: no CUDA device, or a dry run on a machine with one."""
    return NO_CUDA if not torch.cuda.is_available() else "dry run on the CPU"


# -- 1. the CUDA tests -----------------------------------------------------------------------
def junit_counts(report: Path) -> dict[str, Any]:
    """Passed, failed, errors and skipped counts of a pytest JUnit report, and the failing
    tests' names."""
    suites = ElementTree.parse(report).getroot().iter("testsuite")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    failing = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in ElementTree.parse(report).getroot().iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {
        "passed": passed,
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped_tests": counts["skipped"],
        "failing": failing,
    }


def cuda_tests(plan: Plan, work: Path, deadline: Deadline) -> dict[str, Any]:
    """Run :data:`CUDA_TESTS` in a fresh process (its own CUDA context and cuBLAS setup).
    Without CUDA, and in a dry run (CUDA hidden, so the CPU rehearsal stays short), they
    skip, which still shows that every listed test exists."""
    report = work / "cuda-tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS]
    env = dict(os.environ)
    skipped = None if plan.device == "cuda" else on_cpu_because()
    if skipped and torch.cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = ""
    started = time.perf_counter()
    result = subprocess.run(
        [*command, f"--junitxml={report}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=max(30.0, deadline.left() - RESERVE_S),
        check=False,
    )
    if not report.exists():
        raise RuntimeError(f"pytest wrote no report ({result.returncode}): {result.stderr[-500:]}")
    outcome: dict[str, Any] = {
        "skipped": skipped,
        "command": " ".join(["python", *command[1:]]),
        "returncode": result.returncode,
        "wall_s": time.perf_counter() - started,
        **junit_counts(report),
    }
    if result.returncode != 0:
        outcome["output_tail"] = (result.stdout + result.stderr)[-3000:]
    return outcome


# -- 2. fp32 vs bf16 vs fp16 ------------------------------------------------------------------
def final_selection(trainer: Trainer) -> torch.Tensor:
    """The final SMoE layer's top-1 expert at every point of the first
    :data:`EVALUATION_BATCH` validation pairs, computed in float32 (evaluation's precision)."""
    x, _ = next(iter(loader(trainer.val_set, EVALUATION_BATCH, shuffle=False, generator=None)))
    model = trainer.model.eval()
    with torch.no_grad():
        model(x.to(trainer.device))
    return trainer.smoe_layers[-1].last_selection[:, 0].cpu()


def precision_run(plan: Plan, stores: dict[str, Path], precision: str, out: Path):
    """One training of the paper's SMoE in ``precision``: its summary and final validation
    metrics (the last epoch's weights, not the best epoch's, so every precision is compared
    after the same steps) and its selection on the evaluation batch."""
    spec = recipe_spec(
        "config/paper.yaml",
        plan.device,
        precision=precision,
        epochs=plan.precision_epochs,
        stop_at=None,
        early_stop=0,
    )
    trainer = trainer_for(spec, stores, out)
    summary = trainer.run()
    metrics = trainer.task.validate(trainer, trainer.task.routing_tally())
    run = {
        "skipped": None,
        "precision": summary["precision"],
        "device": summary["device"],
        "steps": plan.precision_epochs * steps_per_epoch(trainer),
        "train_time_s": summary["train_time_s"],
        "final_train_loss": trainer.state.history[-1]["train_loss"],
        "val": {
            key: metrics[key]
            for key in ("mse", "prcntclose1.0", "routing_agreement", "map_agreement")
        },
    }
    return run, final_selection(trainer)


def compare_runs(
    reference: dict[str, Any],
    run: dict[str, Any],
    reference_selection: torch.Tensor,
    selection: torch.Tensor,
) -> dict[str, Any]:
    """How a run's selections and final validation metrics stand to the fp32 reference's,
    judged against :data:`TOLERANCE`."""
    ref, val = reference["val"], run["val"]
    close_diff = abs(val["prcntclose1.0"] - ref["prcntclose1.0"])
    mse_diff = abs(val["mse"] - ref["mse"]) / max(abs(ref["mse"]), 1e-30)
    return {
        "skipped": None,
        "selections_equal": bool(torch.equal(selection, reference_selection)),
        "selection_agreement": 100.0 * float((selection == reference_selection).float().mean()),
        "prcntclose1.0_diff_points": close_diff,
        "mse_relative_diff": mse_diff,
        "metrics_within_tolerance": close_diff <= TOLERANCE["prcntclose1.0_points"]
        and mse_diff <= TOLERANCE["mse_relative"],
    }


def all_or_none(values: list[bool | None]) -> bool | None:
    """True when every compared value is, None when nothing was compared."""
    compared = [value for value in values if value is not None]
    return all(compared) if compared else None


def precision_agreement(plan: Plan, work: Path, deadline: Deadline) -> dict[str, Any]:
    """The same training in each precision, compared with fp32; on the CPU (dry run) only
    fp32 trains: autocast does not run there, so bf16 and fp16 would be fp32 again."""
    stores = make_stores(plan.precision_data, work)
    ran = PRECISIONS if plan.device == "cuda" else PRECISIONS[:1]
    skipped = None if plan.device == "cuda" else f"{on_cpu_because()}: autocast runs on CUDA only"
    runs: dict[str, Any] = {name: {"skipped": skipped} for name in PRECISIONS}
    comparisons: dict[str, Any] = {name: {"skipped": skipped} for name in PRECISIONS[1:]}
    selections = {}
    for name in ran:
        runs[name], selections[name] = precision_run(plan, stores, name, work / "precision" / name)
    for name in ran[1:]:
        comparisons[name] = compare_runs(
            runs["fp32"], runs[name], selections["fp32"], selections[name]
        )
    return {
        "skipped": skipped,
        "model": "config/paper.yaml smoe: latent gate, 3 experts, top-1, RC loss, damping",
        "data": dataclasses.asdict(plan.precision_data),
        "epochs": plan.precision_epochs,
        "seed": SEED,
        "evaluation_batch": EVALUATION_BATCH,
        "tolerance": TOLERANCE,
        "runs": runs,
        "comparisons": comparisons,
        "selections_same": all_or_none([c.get("selections_equal") for c in comparisons.values()]),
        "metrics_within_tolerance": all_or_none(
            [c.get("metrics_within_tolerance") for c in comparisons.values()]
        ),
    }


# -- 3. epochs per second ---------------------------------------------------------------------
def epoch_rate(config: str, data: Data, plan: Plan, work: Path) -> dict[str, Any]:
    """``plan.rate_epochs`` epochs of ``config``'s SMoE recipe (its precision, no stop rule);
    epochs per second over the epochs after the first, validation included as in a run."""
    stores = make_stores(data, work)
    spec = recipe_spec(config, plan.device, epochs=plan.rate_epochs, stop_at=None, early_stop=0)
    trainer = trainer_for(spec, stores, work / "rate" / Path(config).stem)
    summary = trainer.run()
    ends = [0.0, *(row["time_s"] for row in trainer.state.history)]
    epoch_s = [end - start for start, end in pairwise(ends)]
    timed = epoch_s[1:] or epoch_s
    return {
        "config": config,
        "data": dataclasses.asdict(data),
        "pairs": len(trainer.train_set),
        "steps_per_epoch": steps_per_epoch(trainer),
        "precision": summary["precision"],
        "device": summary["device"],
        "epochs": len(epoch_s),
        "epoch_s": epoch_s,
        "epochs_per_s": len(timed) / sum(timed),
    }


def epochs_per_second(plan: Plan, work: Path, deadline: Deadline) -> dict[str, Any]:
    """The quick and the paper SMoE recipes' training speed on data of their own size."""
    return {
        "skipped": None,
        "quick": epoch_rate("config/config.yaml", plan.quick_data, plan, work),
        "paper": epoch_rate("config/paper.yaml", plan.paper_data, plan, work),
    }


# -- 4. time to 100 % -------------------------------------------------------------------------
def time_to_100(plan: Plan, work: Path, deadline: Deadline) -> dict[str, Any]:
    """The paper recipe as configured (its precision, 150 epochs, stop at 100 %, early stop)
    on the paper's data, stopped before an epoch would pass the cap: what is left of the
    budget, at most ``plan.cap_s``."""
    stores = make_stores(plan.paper_data, work)
    cap_s = max(0.0, min(plan.cap_s, deadline.left() - RESERVE_S))
    spec = recipe_spec("config/paper.yaml", plan.device)
    started = time.perf_counter()
    trainer = CappedTrainer(
        spec,
        stores["train"],
        stores["val"],
        SEED,
        work / "time-to-100",
        progress=False,
        cap_s=cap_s,
    )
    summary = trainer.run()
    reached = summary["best_value"] >= 100.0
    train_s = summary["train_time_s"]
    time_s = trainer.state.history[summary["best_epoch"]]["time_s"] if reached else None
    if reached:
        result = f"reached 100 % after {time_s:.1f} s ({summary['best_epoch'] + 1} epochs)"
    elif summary["stop_reason"].startswith("time cap"):
        result = f"not reached within {cap_s:.0f} s"
    else:
        result = f"not reached: {summary['stop_reason']} after {train_s:.1f} s"
    return {
        "skipped": None,
        "config": "config/paper.yaml",
        "data": dataclasses.asdict(plan.paper_data),
        "precision": summary["precision"],
        "device": summary["device"],
        "cap_s": cap_s,
        "reached": reached,
        "time_s": time_s,
        "epochs": summary["epochs"],
        "best_value": summary["best_value"],
        "stop_reason": summary["stop_reason"],
        "train_time_s": train_s,
        "wall_s": time.perf_counter() - started,
        "result": result,
    }


# -- the check --------------------------------------------------------------------------------
SECTIONS: dict[str, Callable[[Plan, Path, Deadline], dict[str, Any]]] = {
    "cuda_tests": cuda_tests,
    "precision_agreement": precision_agreement,
    "epochs_per_second": epochs_per_second,
    "time_to_100": time_to_100,
}


def revision() -> str | None:
    """The checkout's commit, when this is a git checkout (a copied tree may not be)."""
    try:
        result = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:  # no git on this machine
        return None
    return result.stdout.strip() or None


def environment(dry_run: bool) -> dict[str, Any]:
    """Where the figures come from: device, torch and CUDA versions, the checkout."""
    cuda = torch.cuda.is_available()
    return {
        "dry_run": dry_run,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
        # "fp32" convolutions may run in TF32 on the GPU when cuDNN is allowed to
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cpu_threads": torch.get_num_threads(),
        "revision": revision(),
    }


def write_json(path: Path, report: dict[str, Any]) -> None:
    """The report so far, replaced atomically (a killed run leaves the last whole one)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=2))
    partial.replace(path)


def run_check(plan: Plan, out: Path, work: Path, budget_s: float, dry_run: bool) -> int:
    """Every section in order, the JSON rewritten after each; 1 when a section raised or a
    test failed."""
    deadline = Deadline(budget_s)
    started = time.perf_counter()
    report: dict[str, Any] = {**environment(dry_run), "budget_s": budget_s, "errors": {}}
    report.update({name: None for name in SECTIONS})
    for name, section in SECTIONS.items():
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        try:
            report[name] = section(plan, work, deadline)
        except Exception as exc:  # recorded; the other sections still run
            traceback.print_exc()
            report["errors"][name] = f"{type(exc).__name__}: {exc}"
        report["wall_s"] = time.perf_counter() - started
        write_json(out, report)
    tests = report["cuda_tests"] or {}
    failed = bool(report["errors"]) or bool(tests.get("failed") or tests.get("errors"))
    return 1 if failed else 0


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON")
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny sizes on the CPU (no GPU needed)"
    )
    parser.add_argument(
        "--cap-s", type=float, default=None, help="time-to-100 cap (default 150; dry run 3)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="the whole check's budget (default 420)"
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="folder for stores and runs, kept (default: temp)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA device found (torch {torch.__version__}); "
            "--dry-run runs the check on the CPU",
            file=sys.stderr,
        )
        return 2
    plan = DRY if args.dry_run else FULL
    if args.cap_s is not None:
        plan = dataclasses.replace(plan, cap_s=args.cap_s)
    work = args.work or Path(tempfile.mkdtemp(prefix="smoe-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        status = run_check(plan, args.out, work.resolve(), args.budget_s, args.dry_run)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"gpu_check: wrote {args.out} (exit status {status})", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
