"""Training: config-driven, seeded, resumable, on CPU or CUDA (mixed precision on CUDA only).

One trainer, every experiment family. :class:`TaskTrainer` owns what all families share:
seeding, device and precision, determinism, the optimizer and scheduler, checkpoints and
resuming, the history, the progress bar, selection of the best epoch, the stop rules and
the summary. A family supplies a small :class:`TrainingTask`: its data, its model, its
optimizer (default :func:`make_optimizer`), one training epoch, one validation, what its data
were made from, and optionally a stop rule of its own: e.g. the heat family's
:class:`smoe.families.heat.task.HeatTask`, the synthetic-cluster family's
:class:`smoe.families.clusters.task.ClusterTask`. This module knows no family.

One run trains one model with one seed and leaves in its folder ``best.pt`` (the checkpoint
evaluation uses: the best validation epoch, never the last by accident), ``last.pt``
(everything needed to resume), ``history.csv`` (one row per epoch) and ``train.json`` (a
summary). A job killed mid-training resumes from ``last.pt`` and ends with the same metrics
as an uninterrupted run: every random state is checkpointed. A ``last.pt`` is only resumed
when its model spec, seed and data (what the task's data were generated from) are this
run's; otherwise, or when it cannot be read, training starts from scratch and the log says
why.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smoe.core.atomic import atomic_file, write_text_atomic
from smoe.core.config import ModelSpec
from smoe.core.errors import InputError
from smoe.core.metrics import is_better, parameter_count
from smoe.core.provenance import describe_difference
from smoe.core.train import distributed
from smoe.core.train.checkpoint import (
    FORMAT,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_atomic,
    seed_everything,
    stream_seed,
)
from smoe.core.train.device import keep_freed_memory, resolve_device, resolve_precision
from smoe.nn.layer import set_loss_scale


class TrainingError(InputError):
    """Training cannot go on: non-finite data or loss (the message names epoch and step)."""


def use_deterministic_algorithms(device: torch.device) -> None:
    """Bit-reproducible training (and so exact resumes) on CPU and, via cuBLAS's fixed
    workspace, on CUDA; must run before the first cuBLAS call of the process.

    ``torch.use_deterministic_algorithms`` also imports ``torch._inductor`` to set the
    compiler's flag, 3 s of a job's start-up on a 2-core machine; nothing here is compiled
    by inductor, so the switch the eager operators read is set alone (the public function
    where this torch has no such switch)."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    switch = getattr(torch._C, "_set_deterministic_algorithms", None)
    if switch is None or "torch._inductor" in sys.modules:
        torch.use_deterministic_algorithms(True)
    else:
        switch(True, warn_only=False)


def param_groups(model: nn.Module, lr: float, gate_lr: float | None) -> list[dict[str, Any]]:
    """Gate parameters get their own learning rate when one is given."""
    gate, other = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (gate if ".gate." in f".{name}" else other).append(param)
    if gate_lr is None or not gate:
        return [{"params": gate + other, "lr": lr}]
    return [{"params": other, "lr": lr}, {"params": gate, "lr": gate_lr, "name": "gate"}]


def make_optimizer(model: nn.Module, settings: dict[str, Any]) -> torch.optim.Optimizer:
    groups = param_groups(model, settings["lr"], settings["gate_lr"])
    if settings["optimizer"] == "sgd":
        return torch.optim.SGD(
            groups,
            lr=settings["lr"],
            momentum=settings["momentum"],
            weight_decay=settings["weight_decay"],
        )
    return torch.optim.Adam(groups, lr=settings["lr"], weight_decay=settings["weight_decay"])


def make_scheduler(optimizer, settings: dict[str, Any]):
    scheduler = settings["scheduler"]
    if scheduler["kind"] == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode=settings["select"]["mode"],
            factor=scheduler["factor"],
            patience=scheduler["patience"],
            min_lr=scheduler["min_lr"],
        )
    if scheduler["kind"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=settings["epochs"], eta_min=scheduler["min_lr"]
        )
    return None


@dataclass
class TrainState:
    """What changes from epoch to epoch besides the model and optimizer."""

    epoch: int = 0
    best_metric: float | None = None
    best_epoch: int = -1
    best_model: dict[str, torch.Tensor] | None = None
    best_metrics: dict[str, float] | None = None
    stale_epochs: int = 0
    history: list[dict[str, Any]] | None = None
    elapsed_s: float = 0.0
    stop_reason: str = ""


class TrainingTask:
    """What one experiment family supplies to :class:`TaskTrainer`.

    The trainer calls, in this order: :meth:`load` (after seeding every generator, with the
    device chosen), :meth:`build_model` (the global torch generator is seeded, so the
    initial weights follow from the run's seed), :meth:`make_optimizer` and
    :meth:`make_scheduler` (only for a model with trainable parameters), then per epoch
    :meth:`train_epoch` and :meth:`validate`, and after each epoch :meth:`stop_reason`.
    :meth:`data_provenance` and :meth:`identity_spec` decide whether a ``last.pt`` is this
    run's; :meth:`data_info` goes into every checkpoint for evaluation to read.
    """

    multi_process: bool = False
    """Whether the family trains on several processes under ``torchrun`` (its
    :meth:`train_epoch` shares each global minibatch out, see
    :mod:`smoe.core.train.distributed`); a family that does not is refused there."""

    keep_freed_memory: bool = False
    """Whether a CPU training keeps freed memory for reuse
    (:func:`smoe.core.train.device.keep_freed_memory`): faster where every step allocates
    the same large tensors again; the process then holds its peak memory to the end."""

    checkpoint_every: int = 1
    """Epochs between two saves of ``last.pt`` (the last epoch is always saved). A killed
    run resumes from the last save and replays the epochs after it exactly, so a longer
    interval only costs replayed work; it saves the time of pickling a long history every
    epoch (a run of hundreds of millisecond-epochs)."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    @property
    def settings(self) -> dict[str, Any]:
        return self.spec.train

    def load(self, device: torch.device) -> None:
        """Read the data (called once, after seeding, before :meth:`build_model`)."""

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer; by default :func:`make_optimizer` of the train settings."""
        return make_optimizer(model, self.settings)

    def make_scheduler(self, optimizer: torch.optim.Optimizer):
        """The learning-rate scheduler or None; by default :func:`make_scheduler`."""
        return make_scheduler(optimizer, self.settings)

    def train_epoch(self, trainer: TaskTrainer, epoch: int) -> dict[str, float]:
        """Train ``trainer.model`` for one epoch; the values of the history row (at least
        ``train_loss``). Random numbers come from the trainer's seeded generators
        (``trainer.generator`` or torch's global one), which every checkpoint saves."""
        raise NotImplementedError

    def validate(self, trainer: TaskTrainer) -> dict[str, float]:
        """Validation metrics of ``trainer.model``; ``train.select.metric`` names one of them.
        In the history each becomes a column ``val_<name>`` (or ``<name>`` when it already
        starts with ``val_``); names holding ``-`` stay out of the history."""
        raise NotImplementedError

    def data_provenance(self) -> dict[str, Any]:
        """What the data were made from: a ``last.pt`` with other provenance is not resumed."""
        raise NotImplementedError

    def data_info(self) -> dict[str, Any]:
        """What evaluation needs to know of the training data (tensors and plain values)."""
        return {}

    def identity_spec(self) -> dict[str, Any]:
        """The part of the spec a resumed checkpoint must match (by default all of it)."""
        return self.spec.to_dict()

    def check_processes(self, model: nn.Module, processes: int) -> None:
        """Refuse (InputError) what this family cannot train on ``processes`` > 1."""

    def stop_reason(self, history: list[dict[str, Any]]) -> str:
        """A family's own stop rule, read after every epoch ("" = go on)."""
        return ""

    def summary_info(self) -> dict[str, Any]:
        """Extra entries of ``train.json`` (none by default)."""
        return {}


class TaskTrainer:
    """Trains the model of one :class:`TrainingTask` with one seed into ``out_dir``; see the
    module docstring. The train settings it reads itself: ``threads``, ``device``,
    ``precision``, ``deterministic``, ``epochs``, ``select`` (``metric``, ``mode``),
    ``stop_at`` and ``early_stop`` (both optional)."""

    def __init__(
        self,
        task: TrainingTask,
        seed: int,
        out_dir: str | Path,
        progress: bool = True,
    ) -> None:
        self.task = task
        self.spec = task.spec
        self.settings = self.spec.train
        self.seed = seed
        self.out_dir = Path(out_dir)
        self.progress = progress
        if self.settings["threads"]:
            torch.set_num_threads(self.settings["threads"])
        self.world = distributed.launched()
        self.device = distributed.device_of(resolve_device(self.settings["device"]), self.world)
        if task.keep_freed_memory and self.device.type == "cpu":
            keep_freed_memory()
        if self.world.multi and not task.multi_process:
            raise InputError(
                f"model {self.spec.name!r}: {type(task).__name__} trains on one process only "
                f"(full batch), but it was started as {self.world.size} processes (torchrun): "
                "start it without torchrun"
            )
        distributed.setup(self.device)
        self.amp_dtype = resolve_precision(self.settings["precision"], self.device)
        if self.settings["deterministic"]:
            use_deterministic_algorithms(self.device)
        self.generator = seed_everything(seed)
        self.streams: dict[str, torch.Generator] = {}
        self._saved_streams: dict[str, dict[str, Any]] = {}
        task.load(self.device)
        self.model = task.build_model().to(self.device)
        if self.world.multi:
            task.check_processes(self.model, self.world.size)
        self.params = parameter_count(self.model)
        self.optimizer = task.make_optimizer(self.model) if self.params else None
        self.scheduler = task.make_scheduler(self.optimizer) if self.params else None
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16
        )
        set_loss_scale(self.model, self.scaler)  # routing signals stay those of the true loss
        self.train_model = distributed.wrap(self.model, self.device)
        """What :meth:`TrainingTask.train_epoch` runs the forward pass through: the model,
        or under several processes its DistributedDataParallel wrapper (which averages the
        gradients); ``model`` is what is validated and saved."""
        self.state = TrainState(history=[])
        self.resumed_from: int | None = None
        self.fresh_start_reason = ""

    def stream(self, name: str, device: torch.device | str | None = None) -> torch.Generator:
        """Random stream ``name`` of this run: a generator on ``device`` (the training
        device by default), seeded by :func:`smoe.core.train.checkpoint.stream_seed` (the run's
        seed and the name), saved in ``last.pt`` and continued on resume.

        A sampling op must draw from a generator on its tensors' device (``torch.multinomial``
        on CUDA refuses a CPU generator), and each kind of draw gets its own stream, so that
        a change to one (more router noise, say) leaves the others' numbers as they were.
        """
        device = torch.device(self.device if device is None else device)
        generator = self.streams.get(name)
        if generator is not None:
            if generator.device.type != device.type:
                raise ValueError(f"stream {name!r} lives on {generator.device}, not {device}")
            return generator
        generator = torch.Generator(device=device).manual_seed(stream_seed(self.seed, name))
        saved = self._saved_streams.pop(name, None)
        if saved is not None and saved["device"] == device.type:
            generator.set_state(saved["state"])
        elif saved is not None:
            self.log(
                f"stream {name!r} was saved on {saved['device']}, this run draws on "
                f"{device.type}: it restarts from its seed"
            )
        self.streams[name] = generator
        return generator

    def _stream_states(self) -> dict[str, dict[str, Any]]:
        states = dict(self._saved_streams)  # restored, not drawn from since
        for name, generator in self.streams.items():
            states[name] = {"device": generator.device.type, "state": generator.get_state()}
        return states

    # -- checkpoints -------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: the spec, the seed and the data (not
        the number of processes, which changes no result)."""
        spec = self.task.identity_spec()
        if "processes" in (spec.get("train") or {}):
            spec = {**spec, "train": {k: v for k, v in spec["train"].items() if k != "processes"}}
        return {
            "spec": spec,
            "seed": self.seed,
            "data_provenance": self.task.data_provenance(),
        }

    def log(self, message: str) -> None:
        """A line for the job's log (stderr), beside the progress bar (rank 0's only)."""
        if self.world.main:
            print(f"smoe train: {message}", file=sys.stderr, flush=True)

    def _data_info(self) -> dict[str, Any]:
        return self.task.data_info()

    def _save_last(self) -> None:
        """``last.pt``, written by rank 0 while the others wait."""
        if self.world.main:
            self._write_last()
        distributed.barrier()

    def _write_last(self) -> None:
        s = self.state
        save_atomic(
            {
                "format": FORMAT,
                **self._identity(),
                "data": self._data_info(),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "scaler": self.scaler.state_dict(),
                "rng": capture_rng(self.generator),
                "streams": self._stream_states(),
                "state": {
                    "epoch": s.epoch,
                    "best_metric": s.best_metric,
                    "best_epoch": s.best_epoch,
                    "best_model": s.best_model,
                    "best_metrics": s.best_metrics,
                    "stale_epochs": s.stale_epochs,
                    "history": s.history,
                    "elapsed_s": s.elapsed_s,
                    "stop_reason": s.stop_reason,
                },
            },
            self.out_dir / "last.pt",
        )

    def _save_best(self) -> None:
        """``best.pt``, written by rank 0 while the others wait."""
        if self.world.main:
            self._write_best()
        distributed.barrier()

    def _write_best(self) -> None:
        s = self.state
        save_atomic(
            {
                "format": FORMAT,
                **self._identity(),
                "data": self._data_info(),
                "model": s.best_model,
                "epoch": s.best_epoch,
                "val_metrics": s.best_metrics,
                "params": self.params,
                "train_time_s": s.elapsed_s,
                "epochs": s.epoch,
                "stop_reason": s.stop_reason,
                "last_row": s.history[-1] if s.history else None,
            },
            self.out_dir / "best.pt",
        )

    def _try_resume(self) -> bool:
        """Continue from ``last.pt`` if it belongs to this exact spec, seed and data."""
        path = self.out_dir / "last.pt"
        if not path.exists():
            return False
        try:
            # On the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest.
            saved = load_checkpoint(path, map_location="cpu")
        except InputError as exc:
            return self._start_fresh(f"{exc}")
        mismatch = self._identity_mismatch(saved)
        if mismatch:
            return self._start_fresh(f"{path} was trained with {mismatch}")
        self.model.load_state_dict(saved["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(saved["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        restore_rng(saved["rng"], self.generator)
        self._saved_streams = dict(saved.get("streams") or {})
        self.streams = {}
        self.state = TrainState(**saved["state"])
        self.resumed_from = self.state.epoch
        self.log(f"resuming from {path} after epoch {self.state.epoch}")
        return True

    def _identity_mismatch(self, saved: dict[str, Any]) -> str:
        """Why ``saved`` is not this run's checkpoint ("" when it is)."""
        current = self._identity()
        if saved.get("seed") != self.seed:
            return f"another seed ({saved.get('seed')}, this run: {self.seed})"
        if saved.get("spec") != current["spec"]:
            change = describe_difference(saved.get("spec") or {}, current["spec"])
            return f"another model spec ({change})"
        old_data = saved.get("data_provenance") or {}
        if old_data != current["data_provenance"]:
            return f"other data ({describe_difference(old_data, current['data_provenance'])})"
        return ""

    def _start_fresh(self, reason: str) -> bool:
        self.fresh_start_reason = reason
        self.log(f"not resuming: {reason}; training from scratch")
        return False

    # -- training ----------------------------------------------------------------------
    def autocast(self):
        """The autocast context of the configured precision (a no-op for float32)."""
        return torch.autocast(
            self.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        )

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        return self.task.train_epoch(self, epoch)

    def _validate(self) -> dict[str, float]:
        return self.task.validate(self)

    def run(self) -> dict[str, Any]:
        """Train until the epochs run out, early stopping or the target metric is reached."""
        resumed = self._try_resume()
        select = self.settings["select"]
        metric_name = select["metric"]
        s = self.state
        if self.params == 0 and not resumed:
            return self._finish_without_training(metric_name)
        epochs = self.settings["epochs"]
        bar = None
        if self.progress and self.world.main:
            from tqdm import tqdm

            bar = tqdm(
                total=epochs,
                initial=s.epoch,
                desc=f"train {self.spec.name}",
                unit="epoch",
                mininterval=1.0,
            )
        while s.epoch < epochs and not s.stop_reason:
            started = time.perf_counter()
            row = {"epoch": s.epoch, **self._train_epoch(s.epoch)}
            metrics = self._validate()
            value = selected_value(metrics, metric_name)
            row.update({_history_name(k): v for k, v in metrics.items() if "-" not in k})
            groups = self.optimizer.param_groups
            row["lr"] = groups[0]["lr"]
            if len(groups) > 1:  # heat: the gate's group; clusters: the router's
                row[f"{groups[-1].get('name', 'gate')}_lr"] = groups[-1]["lr"]
            if is_better(value, s.best_metric, select["mode"]):
                s.best_metric, s.best_epoch, s.stale_epochs = value, s.epoch, 0
                s.best_model = copy.deepcopy(self.model.state_dict())
                s.best_metrics = metrics
            else:
                s.stale_epochs += 1
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(value)
            elif self.scheduler is not None:
                self.scheduler.step()
            s.epoch += 1
            s.elapsed_s += time.perf_counter() - started
            row["time_s"] = s.elapsed_s
            s.history.append(row)
            s.stop_reason = self._stop_reason(value)
            # best.pt is written once, at the end: last.pt carries the best model so far,
            # so a resumed run writes the same best.pt (a save per improving epoch cost a
            # gated seed a second, with its selection mode "last" improving every epoch)
            if s.epoch % self.task.checkpoint_every == 0:
                self._save_last()
                if s.epoch == _interrupt_epoch():
                    raise KeyboardInterrupt(f"{INTERRUPT_ENV}={s.epoch}")
            if bar is not None:
                bar.update(1)
                bar.set_postfix({"loss": f"{row['train_loss']:.3g}", metric_name: f"{value:.4g}"})
        if bar is not None:
            bar.close()
        s.stop_reason = s.stop_reason or "epochs"
        self._save_best()
        self._save_last()
        return self._write_summary(metric_name)

    def _stop_reason(self, value: float) -> str:
        settings = self.settings
        target = settings.get("stop_at")
        if target is not None and not is_better(target, value, settings["select"]["mode"]):
            return f"reached {settings['select']['metric']} {target}"
        early_stop = settings.get("early_stop")
        if early_stop and self.state.stale_epochs >= early_stop:
            return f"no improvement for {early_stop} epochs"
        return self.task.stop_reason(self.state.history)

    def _finish_without_training(self, metric_name: str) -> dict[str, Any]:
        """A model without parameters (persistence, an analytic predictor) is only validated;
        one with candidate settings (the best single stencil) keeps the best on validation."""
        s = self.state
        mode = self.settings["select"]["mode"]
        candidates = getattr(self.model, "candidates", lambda: ())()
        for index, candidate in enumerate(candidates or [None]):
            if candidate is not None:
                self.model.choose(candidate)
            metrics = self._validate()
            value = selected_value(metrics, metric_name)
            s.history.append(
                {
                    "epoch": index,
                    **({"candidate": candidate} if candidate is not None else {}),
                    **{_history_name(k): v for k, v in metrics.items() if "-" not in k},
                }
            )
            if is_better(value, s.best_metric, mode):
                s.best_metric, s.best_epoch, s.best_metrics = value, index, metrics
                s.best_model = copy.deepcopy(self.model.state_dict())
        s.epoch, s.stop_reason = len(s.history), "no trainable parameters"
        if candidates:
            chosen = s.history[s.best_epoch]["candidate"]
            s.stop_reason += f"; chose {chosen} of {list(candidates)} on validation"
        self._save_best()
        return self._write_summary(metric_name)

    def _write_summary(self, metric_name: str) -> dict[str, Any]:
        s = self.state
        self._write_history()
        summary = {
            "model": self.spec.name,
            "kind": self.spec.kind,
            "seed": self.seed,
            "params": self.params,
            "device": str(self.device),
            "precision": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32",
            "epochs": s.epoch,
            "best_epoch": s.best_epoch,
            "select_metric": metric_name,
            "best_value": s.best_metric,
            "stop_reason": s.stop_reason,
            "train_time_s": s.elapsed_s,
            "resumed_from_epoch": self.resumed_from,
            "fresh_start_reason": self.fresh_start_reason or None,
            "val_metrics": s.best_metrics,
            **self.task.summary_info(),
        }
        if self.world.main:
            write_text_atomic(
                self.out_dir / "train.json", json.dumps(summary, indent=2, default=_json_default)
            )
        distributed.barrier()
        return summary

    def _write_history(self) -> None:
        if not self.world.main:
            return
        rows = self.state.history
        columns: list[str] = []
        for row in rows:
            columns += [key for key in row if key not in columns]
        with atomic_file(self.out_dir / "history.csv") as partial:
            with open(partial, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)


INTERRUPT_ENV = "SMOE_INTERRUPT_AFTER_EPOCH"
"""Tests of resuming set it to k: training stops as if interrupted right after ``last.pt``
of epoch k was saved (what a killed job leaves), on every process alike."""


def _interrupt_epoch() -> int | None:
    text = os.environ.get(INTERRUPT_ENV, "")
    return int(text) if text.strip().isdigit() else None


def _history_name(metric: str) -> str:
    """The history column of a validation metric: ``val_`` in front, once."""
    return metric if metric.startswith("val_") else f"val_{metric}"


def selected_value(metrics: dict[str, float], name: str) -> float:
    """The selection metric's value, or an error listing the metrics that exist."""
    if name not in metrics:
        raise InputError(
            f"train.select.metric {name!r} is not a computed metric; "
            f"available: {', '.join(sorted(metrics))}"
        )
    return metrics[name]


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")
