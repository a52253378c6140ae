"""Learning-rate selection on the validation split: one training per candidate rate.

:func:`tune_lr` trains a model once for every candidate learning rate with
:func:`smoe.families.heat.task.train` (same seed, so the same initial weights and batch order for
every rate), each in its own folder under a work directory, and picks the rate whose best
validation epoch scores best on the config's selection metric (``train.select``). The test
split is never read. The table goes to a CSV; a rate whose training diverges (non-finite
loss) is recorded as diverged and cannot win. Runs interrupted midway resume from their
``last.pt`` when the same command is run again.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from smoe.core.atomic import atomic_file
from smoe.core.config import ModelSpec
from smoe.core.errors import InputError
from smoe.core.metrics import is_better
from smoe.core.train.loop import TrainingError
from smoe.families.heat.task import train

COLUMNS = (
    "lr",
    "metric",
    "best_value",
    "best_epoch",
    "epochs",
    "stop_reason",
    "train_time_s",
    "folder",
)


@dataclass(frozen=True)
class Trial:
    """One candidate rate's outcome: the best validation value and the epoch it came from."""

    lr: float
    metric: str
    best_value: float  # NaN when the training diverged
    best_epoch: int  # -1 when the training diverged
    epochs: int
    stop_reason: str
    train_time_s: float
    folder: Path

    @property
    def finished(self) -> bool:
        return math.isfinite(self.best_value)

    def row(self) -> dict[str, Any]:
        return {
            "lr": repr(self.lr),
            "metric": self.metric,
            "best_value": repr(self.best_value),
            "best_epoch": self.best_epoch,
            "epochs": self.epochs,
            "stop_reason": self.stop_reason,
            "train_time_s": f"{self.train_time_s:.3f}",
            "folder": str(self.folder),
        }


@dataclass(frozen=True)
class TuneResult:
    trials: list[Trial]
    best: Trial
    mode: str
    csv: Path


def check_lrs(lrs: list[float]) -> list[float]:
    """Candidate rates: at least one, each finite and positive, none repeated."""
    if not lrs:
        raise InputError("give at least one learning rate to try")
    for lr in lrs:
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr):
            raise InputError(f"learning rate {lr!r} is not a finite number")
        if lr <= 0:
            raise InputError(f"learning rate {lr!r} must be positive")
    repeated = sorted({lr for lr in lrs if lrs.count(lr) > 1})
    if repeated:
        raise InputError(f"learning rate {repeated[0]!r} is given more than once")
    return [float(lr) for lr in lrs]


def work_dir(out_csv: str | Path) -> Path:
    """Where the trainings go: ``<csv name without suffix>.runs/`` beside the CSV."""
    out_csv = Path(out_csv)
    return out_csv.with_name(f"{out_csv.stem}.runs")


def trial_spec(spec: ModelSpec, lr: float, epochs: int | None) -> ModelSpec:
    """``spec`` with its learning rate (and, if given, its epoch budget) replaced."""
    settings = {**spec.train, "lr": lr}
    if epochs is not None:
        settings["epochs"] = epochs
    return replace(spec, train=settings)


def best_trial(trials: list[Trial], mode: str) -> Trial:
    """The trial with the best validation value (the first in the given order on ties)."""
    best: Trial | None = None
    for trial in trials:
        if trial.finished and (best is None or is_better(trial.best_value, best.best_value, mode)):
            best = trial
    if best is None:
        raise InputError(
            "every learning rate diverged (non-finite loss); try smaller ones: "
            + ", ".join(f"{t.lr:g}" for t in trials)
        )
    return best


def write_csv(trials: list[Trial], out_csv: Path) -> Path:
    with atomic_file(out_csv) as partial:
        with open(partial, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(trial.row() for trial in trials)
    return out_csv


def tune_lr(
    spec: ModelSpec,
    lrs: list[float],
    train_store: str | Path,
    val_store: str | Path,
    seed: int,
    out_csv: str | Path,
    epochs: int | None = None,
    progress: bool = False,
) -> TuneResult:
    """Train ``spec`` once per rate in ``lrs`` and choose the rate by validation; see module."""
    lrs = check_lrs(list(lrs))
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int)):
        raise InputError(f"epochs must be an integer, got {epochs!r}")
    if epochs is not None and epochs < 1:
        raise InputError(f"epochs must be at least 1, got {epochs}")
    out_csv = Path(out_csv)
    if out_csv.suffix.lower() != ".csv":
        raise InputError(f"output {str(out_csv)!r} must be a .csv file")
    select = spec.train["select"]
    metric, mode = select["metric"], select["mode"]
    folder_root = work_dir(out_csv)
    trials: list[Trial] = []
    for lr in lrs:
        folder = folder_root / f"lr{lr!r}"
        try:
            summary = train(
                trial_spec(spec, lr, epochs), train_store, val_store, seed, folder, progress
            )
        except TrainingError as exc:
            trial = Trial(lr, metric, math.nan, -1, 0, f"diverged: {exc}", 0.0, folder)
        else:
            if summary["params"] == 0:
                raise InputError(
                    f"model {spec.name!r} has no trainable parameters; there is no learning "
                    "rate to tune"
                )
            trial = Trial(
                lr,
                metric,
                float(summary["best_value"]),
                int(summary["best_epoch"]),
                int(summary["epochs"]),
                str(summary["stop_reason"]),
                float(summary["train_time_s"]),
                folder,
            )
        trials.append(trial)
    write_csv(trials, out_csv)
    best = best_trial(trials, mode)
    return TuneResult(trials=trials, best=best, mode=mode, csv=out_csv)
