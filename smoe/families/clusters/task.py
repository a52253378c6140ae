"""The synthetic-cluster family (Chen et al., NeurIPS 2022) through the shared trainer.

:class:`ClusterTask` is what this family gives :class:`smoe.core.train.loop.TaskTrainer`; the
seeding, checkpoints, resuming, history, selection of the best epoch and summary are the
trainer's, as for heat. :func:`train_cluster` trains one model with one seed,
:func:`evaluate_cluster_checkpoint` scores its ``best.pt`` on a test store.

Training follows the paper's official code (uclaml/MoE notebooks), each kind with its own
recipe. Full batch, so one epoch is one optimiser step on every training sample
(:func:`smoe.families.clusters.models.cluster_optimizer`):

* the MoE: experts by normalised gradient descent (1e-3), the router by plain gradient
  descent (0.1), the loss :func:`smoe.families.clusters.models.cluster_loss` (softmax, then
  cross-entropy: it floors near 0.313) plus the model's auxiliary loss when it has one; at
  most 501 epochs (0..500);
* a single CNN: Adam (3e-3 linear, 1e-2 cubic; weight decay 5e-4), the plain cross-entropy
  of its logits (:func:`smoe.families.clusters.models.single_loss`); at most 801 epochs (0..800).

The official early stop on the training loss (:func:`official_stop`): each epoch the loss of
the forward pass before the step is compared with the lowest loss of the epochs before; when
it is not a new minimum (a tie counts as one, as the official ``loss <= min_loss`` has it), the
epoch is at least ``stop_from`` and either the loss exceeds that minimum + ``stop_rise`` or is
<= ``stop_loss``, training stops without taking that epoch's step. Defaults by kind
(:data:`STOP_DEFAULTS`): the MoE from epoch 0, rise 0.02, floor 0.314; a single CNN from
epoch 501 (the official ``epoch > 500``), rise 0.02, no floor. The thresholds are compared as
the official code's float32 tensor comparisons do (rounded to float32). The stopping epoch's
history row is still written (its forward pass ran: its loss, accuracy and dispatch entropy),
and its validation repeats the epoch before's (the weights did not move).

Unlike the official code, a validation part is carved from the train store
(``data.val_fraction``, default 0.1: the model trains on the other 90 %) and the epoch with
the best validation accuracy is kept (ties: the earlier epoch), where the official code tests
the weights the last epoch run left.

The carve depends only on the data: the train store's seed picks it (the stream after the
generator's three, ``numpy SeedSequence(data seed).spawn(4)[3]``), so every model and every
model seed of a data set trains and validates on the same samples; the carve is part of the
data identity a ``last.pt`` must match to be resumed.

Randomness: the initial weights come from torch's global generator, seeded by the run's seed.
The MoE's training router noise comes from its own stream, ``trainer.stream("router_noise")``
(seeded by the run's seed and the stream's name, on the training device, saved in every
``last.pt`` and continued on resume), so it never repeats the numbers that drew the initial
weights (the official code draws both from one generator) and a resumed run draws the noise
an uninterrupted one does. Validation and evaluation route without noise unless the model
option ``test_noise`` is set; then the noise comes from a generator seeded by
``stream_seed(seed, "evaluation_noise")``, fresh for every pass, so scores stay reproducible
and training's stream is untouched.

Dispatch entropy as published: the official code computes it on every training forward pass
(router noise on, the training data, before that epoch's update) and reports the last epoch
run's. Each MoE history row has it (``train_dispatch_entropy``, on our training part: the 90 %
of the train store left by the carve), ``best.pt`` keeps the last row (``last_row``), and
evaluation reports that value as ``dispatch_entropy``; the kept checkpoint's entropy under
evaluation routing on the whole train store is ``dispatch_entropy_eval`` beside it.

Train settings (``spec.train``; defaults where a key is absent, see :data:`TRAIN_DEFAULTS`;
null: the kind's official value): ``epochs`` (MoE 501, singles 801), ``lr`` (null: the
optimiser's default), ``router_lr`` (null: 0.1; MoE only), ``weight_decay`` (null: Adam's
5e-4 for singles; the MoE has none), ``stop_on_loss`` (true: the official early stop above;
false: every epoch), ``stop_loss`` (null: MoE 0.314, singles none; a negative value never
stops), ``stop_rise`` (null: 0.02), ``stop_from`` (null: MoE 0, singles 501), ``select``
``{metric: val_accuracy, mode: max}``, ``device`` ``cpu`` | ``cuda`` | ``auto``,
``precision`` (``fp32`` only), ``threads`` 1, ``deterministic`` true, ``progress`` true,
``checkpoint_every`` 25 (epochs between saves of ``last.pt``: a full-batch epoch takes
milliseconds, pickling the history every epoch would cost more than training), and the
trainer's generic ``stop_at`` and ``early_stop`` (null: off). ``progress`` and
``checkpoint_every`` change no result, so a ``last.pt`` is resumed across them.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from smoe.core.config import ModelSpec
from smoe.core.errors import InputError
from smoe.core.metrics import parameter_count
from smoe.core.provenance import describe_difference
from smoe.core.report.results import write_json
from smoe.core.train.checkpoint import load_checkpoint, stream_seed
from smoe.core.train.device import resolve_device
from smoe.core.train.loop import TaskTrainer, TrainingError, TrainingTask
from smoe.families.clusters.metrics import accuracy, dispatch_entropy, dispatch_matrix
from smoe.families.clusters.models import (
    CLUSTER_KINDS,
    ClusterMoE,
    PatchCNN,
    build_cluster_model,
    cluster_optimizer,
    loss_function,
)
from smoe.families.clusters.store import ClusterData, cluster_provenance, open_cluster_split

__all__ = [
    "ClusterTask",
    "TRAIN_DEFAULTS",
    "carve_validation",
    "evaluate_cluster_checkpoint",
    "official_stop",
    "resolve_cluster_spec",
    "train_cluster",
    "write_json",
]

FAMILY = "clusters"

EPOCHS = {"cluster_moe": 501, "cluster_single": 801}
"""Default epochs by kind: the official code's ``range(501)`` MoE and ``range(801)`` single
epochs (indices 0..500 and 0..800)."""

STOP_DEFAULTS: dict[str, dict[str, Any]] = {
    "cluster_moe": {"stop_loss": 0.314, "stop_rise": 0.02, "stop_from": 0},
    "cluster_single": {"stop_loss": None, "stop_rise": 0.02, "stop_from": 501},
}
"""The official early stop's settings by kind (what ``null`` means): the MoE's ``loss >
min_loss + 0.02 or loss <= 0.314`` from epoch 0, the singles' ``epoch > 500 and loss >
min_loss + 0.02`` (no floor)."""

TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": None,  # EPOCHS by kind
    "lr": None,
    "router_lr": None,
    "weight_decay": None,
    "stop_on_loss": True,
    "stop_loss": None,  # STOP_DEFAULTS by kind
    "stop_rise": None,
    "stop_from": None,
    "select": {"metric": "val_accuracy", "mode": "max"},
    "device": "cpu",
    "precision": "fp32",
    "threads": 1,
    "deterministic": True,
    "progress": True,
    "stop_at": None,
    "early_stop": None,
    "checkpoint_every": 25,
}
"""Every train setting of the cluster family with its default."""

EVALUATION_NOISE = "evaluation_noise"
"""Name of the stream (:func:`smoe.core.train.checkpoint.stream_seed`) that seeds the router noise
of a validation or evaluation pass with ``test_noise``, fresh for every pass."""

DATA_DEFAULTS: dict[str, Any] = {"val_fraction": 0.1}
"""Every data setting of a cluster model's spec with its default."""

CARVE_STREAM = 3
"""Index of the validation carve's stream among ``SeedSequence(data seed).spawn(4)``."""

NOT_IDENTITY = ("progress", "checkpoint_every")
"""Train settings that cannot change a result, so a ``last.pt`` is resumed across them."""


# -- specs -------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_settings(name: str, kind: str, train: dict[str, Any]) -> None:
    where = f"model {name!r}: train"
    epochs = train["epochs"]
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise InputError(f"{where}.epochs must be a positive integer, got {epochs!r}")
    for key in ("lr", "router_lr", "weight_decay", "stop_loss", "stop_rise", "stop_at"):
        value = train[key]
        if value is not None and not _is_number(value):
            raise InputError(f"{where}.{key} must be a number or null, got {value!r}")
        if value is not None and key in ("lr", "router_lr", "weight_decay", "stop_rise"):
            if value < 0:
                raise InputError(f"{where}.{key} must be >= 0, got {value!r}")
    start = train["stop_from"]
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise InputError(
            f"{where}.stop_from must be an integer >= 0 (the first epoch that may stop) or null "
            f"(the kind's official: {STOP_DEFAULTS[kind]['stop_from']}), got {start!r}"
        )
    if not isinstance(train["stop_on_loss"], bool):
        raise InputError(
            f"{where}.stop_on_loss must be true or false, got {train['stop_on_loss']!r}"
        )
    if kind == "cluster_moe" and train["weight_decay"]:
        raise InputError(
            f"{where}.weight_decay must be null or 0 for {kind}: the experts' normalised "
            f"gradient descent has no weight decay, got {train['weight_decay']!r}"
        )
    if kind == "cluster_single" and train["router_lr"] is not None:
        raise InputError(f"{where}.router_lr must be null for {kind}: a single CNN has no router")
    every = train["checkpoint_every"]
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise InputError(f"{where}.checkpoint_every must be a positive integer, got {every!r}")
    early = train["early_stop"]
    if early is not None and (isinstance(early, bool) or not isinstance(early, int) or early < 0):
        raise InputError(f"{where}.early_stop must be an integer >= 0 or null, got {early!r}")
    if train["device"] not in ("cpu", "cuda", "auto"):
        raise InputError(f"{where}.device must be cpu, cuda or auto, got {train['device']!r}")
    if train["precision"] != "fp32":
        raise InputError(
            f"{where}.precision must be fp32 (cubic filters and the softmax-floored loss are "
            f"trained in float32), got {train['precision']!r}"
        )
    threads = train["threads"]
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 0
    ):
        raise InputError(f"{where}.threads must be an integer >= 0 or null, got {threads!r}")
    for key in ("deterministic", "progress"):
        if not isinstance(train[key], bool):
            raise InputError(f"{where}.{key} must be true or false, got {train[key]!r}")
    select = train["select"]
    if not isinstance(select.get("metric"), str) or select.get("mode") not in ("min", "max"):
        raise InputError(
            f"{where}.select must hold a metric name and mode min or max, got {select!r}"
        )


def resolve_cluster_spec(spec: ModelSpec | Mapping[str, Any]) -> ModelSpec:
    """The spec with every default filled in and every value checked (InputError naming the
    key). A mapping may leave out ``options``, ``train``, ``data`` and ``evaluate``."""
    if isinstance(spec, ModelSpec):
        spec = spec.to_dict()
    if not isinstance(spec, Mapping):
        raise InputError(f"a model spec must be a mapping, got {type(spec).__name__}")
    for key in ("name", "kind"):
        if not isinstance(spec.get(key), str):
            raise InputError(f"model spec: {key} must be a string, got {spec.get(key)!r}")
    name, kind = spec["name"], spec["kind"]
    if kind not in CLUSTER_KINDS:
        raise InputError(
            f"model {name!r}: kind {kind!r} is not a cluster model; known: "
            f"{', '.join(CLUSTER_KINDS)}"
        )
    sections = {}
    for key in ("options", "train", "data", "evaluate"):
        value = spec.get(key) or {}
        if not isinstance(value, Mapping):
            raise InputError(f"model {name!r}: {key} must be a mapping, got {value!r}")
        sections[key] = copy.deepcopy(dict(value))
    for section, known in (("train", TRAIN_DEFAULTS), ("data", DATA_DEFAULTS), ("evaluate", {})):
        for key in sections[section]:
            if key not in known:
                listed = ", ".join(known) or "none"
                raise InputError(
                    f"model {name!r}: {section}.{key} is not a setting of the cluster family; "
                    f"known: {listed}"
                )
    given = sections["train"]
    select = given.pop("select", None) or {}
    if not isinstance(select, Mapping):
        raise InputError(f"model {name!r}: train.select must be a mapping, got {select!r}")
    train = {**copy.deepcopy(TRAIN_DEFAULTS), **given}
    train["select"] = {**TRAIN_DEFAULTS["select"], **select}
    if train["epochs"] is None:
        train["epochs"] = EPOCHS[kind]
    for key, default in STOP_DEFAULTS[kind].items():
        if train[key] is None:
            train[key] = default
    _check_settings(name, kind, train)
    data = {**DATA_DEFAULTS, **sections["data"]}
    fraction = data["val_fraction"]
    if not _is_number(fraction) or not 0 < fraction < 1:
        raise InputError(
            f"model {name!r}: data.val_fraction must be a number between 0 and 1 (exclusive), "
            f"got {fraction!r}"
        )
    build_cluster_model(kind, sections["options"], 2)  # options checked before any work
    return ModelSpec(name, kind, sections["options"], train, data, sections["evaluate"])


# -- the official early stop -------------------------------------------------------------


def _float32(value: float) -> float:
    """``value`` rounded to float32: what a threshold becomes when the official code compares
    a float32 loss tensor with it (``loss > min_loss + 0.02``, ``loss <= 0.314``)."""
    return float(np.float32(value))


def official_stop(
    losses: Sequence[float],
    stop_loss: float | None,
    stop_rise: float | None,
    stop_from: int = 0,
) -> str:
    """Whether the official code stops at the epoch of ``losses[-1]`` ("" = go on), before
    taking its step: ``losses`` are the training losses of epochs 0, 1, ..., this one, each
    of the forward pass before that epoch's update.

    A new minimum (``loss <= min(losses[:-1])``; the first epoch always is one) never stops;
    otherwise, from epoch ``stop_from`` on, a loss above that minimum + ``stop_rise`` or one
    <= ``stop_loss`` stops (either None: that test is off). The official MoE: ``stop_loss``
    0.314, ``stop_rise`` 0.02, ``stop_from`` 0; the official singles: no floor, 0.02, 501 (its
    ``epoch > 500``). The thresholds are rounded to float32, as the official code's tensor
    comparisons round them.
    """
    if not losses:
        raise ValueError("official_stop needs at least this epoch's loss")
    *previous, loss = (float(value) for value in losses)
    epoch = len(previous)
    if not previous:
        return ""
    lowest = min(previous)
    if loss <= lowest or epoch < stop_from:
        return ""
    if stop_rise is not None and loss > _float32(lowest + stop_rise):
        return (
            f"train loss {loss:.4f} at epoch {epoch} rose more than stop_rise {stop_rise} "
            f"above its minimum {lowest:.4f}; stopped before that epoch's step"
        )
    if stop_loss is not None and loss <= _float32(stop_loss):
        return (
            f"train loss {loss:.4f} at epoch {epoch}, not a new minimum ({lowest:.4f}), "
            f"reached stop_loss {stop_loss}; stopped before that epoch's step"
        )
    return ""


# -- data --------------------------------------------------------------------------------


def carve_validation(samples: int, fraction: float, data_seed: int) -> tuple[np.ndarray, ...]:
    """(train indices, validation indices) of a train store of ``samples`` samples, both
    sorted, disjoint and together every index; ``round(fraction * samples)`` (at least 1)
    for validation, chosen by the data seed's carve stream alone."""
    if samples < 2:
        raise InputError(f"a train store of {samples} sample(s) cannot give a validation part")
    count = min(max(1, round(fraction * samples)), samples - 1)
    stream = np.random.SeedSequence(data_seed).spawn(CARVE_STREAM + 1)[CARVE_STREAM]
    order = np.random.default_rng(stream).permutation(samples)
    return np.sort(order[count:]), np.sort(order[:count])


def _indices_digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()


def _open_train(path: Path) -> ClusterData:
    data = open_cluster_split(path)
    if data.split != "train":
        raise InputError(f"store {str(path)!r} holds the {data.split} split, not train")
    if not np.isfinite(data.x).all():
        raise TrainingError(f"store {str(path)!r}: non-finite value (NaN or Inf) in x")
    return data


class ClusterTask(TrainingTask):
    """The synthetic-cluster family's part of training; see the module docstring."""

    keep_freed_memory = True

    def __init__(self, spec: ModelSpec | Mapping[str, Any], train_store: str | Path) -> None:
        super().__init__(resolve_cluster_spec(spec))
        self.train_store = Path(train_store)
        self.checkpoint_every = self.settings["checkpoint_every"]
        self.stopping = ""
        """Why the official early stop ended training at the last epoch run ("" = it did
        not): set by :meth:`train_epoch`, which then takes no step, read by
        :meth:`stop_reason`."""

    # -- data and model ------------------------------------------------------------------
    def load(self, device: torch.device) -> None:
        data = _open_train(self.train_store)
        fraction = self.spec.data["val_fraction"]
        train_index, val_index = carve_validation(len(data), fraction, data.seed)
        self.data = data
        self.train_index, self.val_index = train_index, val_index
        x = torch.from_numpy(data.x)
        label = torch.from_numpy(data.label)
        cluster = torch.from_numpy(data.cluster)
        self.x, self.y, self.clusters = (
            t[torch.from_numpy(train_index)].to(device) for t in (x, label, cluster)
        )
        self.val_x, self.val_y, self.val_clusters = (
            t[torch.from_numpy(val_index)].to(device) for t in (x, label, cluster)
        )
        self.carve = {
            "val_fraction": float(fraction),
            "data_seed": int(data.seed),
            "train_samples": int(train_index.size),
            "val_samples": int(val_index.size),
            "val_indices_sha256": _indices_digest(val_index),
        }
        self.provenance = {"train": cluster_provenance(data), "validation": self.carve}

    def build_model(self) -> nn.Module:
        setting = self.data.setting
        model = build_cluster_model(self.spec.kind, self.spec.options, setting.dim)
        self.loss = loss_function(model)
        """The kind's loss: the MoE's softmax cross-entropy, a single's plain one."""
        return model

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        settings = self.settings
        return cluster_optimizer(
            model,
            lr=settings["lr"],
            router_lr=settings["router_lr"],
            weight_decay=settings["weight_decay"],
        )

    def make_scheduler(self, optimizer: torch.optim.Optimizer):
        return None

    # -- identity and records ------------------------------------------------------------
    def data_provenance(self) -> dict[str, Any]:
        return self.provenance

    def identity_spec(self) -> dict[str, Any]:
        spec = self.spec.to_dict()
        spec["train"] = {k: v for k, v in spec["train"].items() if k not in NOT_IDENTITY}
        return spec

    def data_info(self) -> dict[str, Any]:
        setting = self.data.setting
        return {
            "family": FAMILY,
            "setting": setting.to_dict(),
            "dim": setting.dim,
            "clusters": setting.clusters,
            "train_store": str(self.train_store),
            **self.carve,
        }

    def summary_info(self) -> dict[str, Any]:
        return {
            "family": FAMILY,
            "setting": self.data.setting.name,
            "data_seed": self.carve["data_seed"],
            "train_samples": self.carve["train_samples"],
            "val_samples": self.carve["val_samples"],
        }

    # -- one epoch -----------------------------------------------------------------------
    def train_epoch(self, trainer: TaskTrainer, epoch: int) -> dict[str, float]:
        """One full-batch step; the row's loss, accuracy and (MoE) dispatch entropy are those
        of this epoch's forward pass, before the update, as the official code reads them.
        When the official early stop fires on this loss (:func:`official_stop`), the step is
        not taken and :meth:`stop_reason` ends training after this row."""
        model, optimizer, scaler = trainer.model, trainer.optimizer, trainer.scaler
        model.train()
        moe = isinstance(model, ClusterMoE)
        if moe:  # the training noise: its own seeded stream, on the training device
            model.generator = trainer.stream("router_noise")
        with trainer.autocast():
            logits = model(self.x)
        loss = self.loss(logits.float(), self.y)
        aux = model.aux_loss() if moe else None
        total = loss if aux is None else loss + aux
        value = float(total.detach())
        if not math.isfinite(value):
            raise TrainingError(
                f"model {self.spec.name!r}: the loss became non-finite (NaN or Inf) at epoch "
                f"{epoch}; lower train.lr or check the data"
            )
        row = {
            "train_loss": float(loss.detach()),
            "train_accuracy": accuracy(logits.detach(), self.y),
        }
        if aux is not None:
            row["train_aux"] = float(aux.detach())
            row["train_total"] = value  # what the official early stop reads
        if moe:
            counts = dispatch_matrix(
                model.last_dispatch, self.clusters, model.num_experts, self.data.setting.clusters
            )
            row["train_dispatch_entropy"] = dispatch_entropy(counts)
        self.stopping = self._official_stop(trainer.state.history, value)
        if not self.stopping:
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
        return row

    def _official_stop(self, history: list[dict[str, Any]], loss: float) -> str:
        settings = self.settings
        if not settings["stop_on_loss"]:
            return ""
        losses = [row.get("train_total", row["train_loss"]) for row in history]
        return official_stop(
            [*losses, loss], settings["stop_loss"], settings["stop_rise"], settings["stop_from"]
        )

    def validate(self, trainer: TaskTrainer) -> dict[str, float]:
        """Accuracy (percent) and loss (the kind's training loss) on the validation part;
        for the MoE also the dispatch entropy of its (noise-free unless ``test_noise``)
        routing there."""
        model = trainer.model
        logits, dispatch = routed_logits(model, self.val_x, trainer.seed)
        metrics = {
            "val_accuracy": accuracy(logits, self.val_y),
            "val_loss": float(self.loss(logits, self.val_y)),
        }
        if dispatch is not None:
            counts = dispatch_matrix(
                dispatch, self.val_clusters, model.num_experts, self.data.setting.clusters
            )
            metrics["val_dispatch_entropy"] = dispatch_entropy(counts)
        return metrics

    def stop_reason(self, history: list[dict[str, Any]]) -> str:
        """The official early stop on the training loss, decided in :meth:`train_epoch` (where
        the stopping epoch's step was not taken)."""
        return self.stopping


@torch.no_grad()
def routed_logits(
    model: nn.Module, x: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (float32) of ``model`` in evaluation mode on ``x`` in one pass, and for the MoE
    each sample's expert. Router noise (only with ``test_noise``) comes from a generator on
    ``x``'s device seeded by ``stream_seed(seed, "evaluation_noise")``, fresh for this pass
    (independent of the initial weights' and the training noise's numbers); the model's own
    generator is left as it was."""
    was_training = model.training
    model.eval()
    try:
        if not isinstance(model, ClusterMoE):
            return model(x).float(), None
        saved = model.generator
        generator = torch.Generator(device=x.device)
        model.generator = generator.manual_seed(stream_seed(seed, EVALUATION_NOISE))
        try:
            logits = model(x).float()
        finally:
            model.generator = saved
        return logits, model.last_dispatch
    finally:
        model.train(was_training)


# -- entry points ------------------------------------------------------------------------


def train_cluster(
    spec: ModelSpec | Mapping[str, Any],
    train_store: str | Path,
    seed: int,
    out_dir: str | Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one cluster-family model with one seed into ``out_dir`` (``best.pt``,
    ``last.pt``, ``history.csv``, ``train.json``); returns the ``train.json`` summary. A
    progress bar shows when both ``progress`` and the spec's ``train.progress`` are true."""
    task = ClusterTask(spec, train_store)
    show = progress and task.settings["progress"]
    return TaskTrainer(task, seed, out_dir, show).run()


def _same_data_set(train: ClusterData, test: ClusterData) -> bool:
    """Whether two splits come from one setting and seed (so share the vectors)."""
    a, b = cluster_provenance(train), cluster_provenance(test)
    keep = ("split", "samples")
    generator = [{k: v for k, v in p["generator"].items() if k not in keep} for p in (a, b)]
    return generator[0] == generator[1] and a["vectors_sha256"] == b["vectors_sha256"]


def _describe(data: ClusterData) -> str:
    return f"{str(data.path)!r} (setting {data.setting.name}, seed {data.seed}, {data.split})"


def evaluate_cluster_checkpoint(
    checkpoint: str | Path, test_store: str | Path, train_store: str | Path
) -> dict[str, Any]:
    """Scores of a cluster model's ``best.pt``: accuracies on the test store, the train part
    and the validation part of the train store, and for the MoE:

    * ``dispatch_entropy``: the published definition, the official code's figure: the
      entropy of the last training forward pass run (router noise on, our training part of
      the train store, i.e. the 90 % left by the validation carve, before that epoch's
      update), read from the last history row ``best.pt`` keeps (``last_row``);
    * ``dispatch_entropy_eval``: the kept (best-validation) checkpoint's entropy on the whole
      train store routed as at evaluation, and ``test_dispatch_entropy`` the same on the test
      store; ``dispatch`` holds both count matrices (expert x cluster).

    One float32 pass per store on the configured device; evaluation routes without noise
    unless the model's ``test_noise`` (then seeded by the run's seed and the stream name
    ``evaluation_noise``).

    The train store must be the one the model was trained on, the test store must come from
    the same setting and seed (the same generating vectors); otherwise an InputError names
    both.
    """
    checkpoint, test_store, train_store = Path(checkpoint), Path(test_store), Path(train_store)
    saved = load_checkpoint(checkpoint)
    info = saved.get("data") or {}
    if "val_metrics" not in saved:
        raise InputError(f"{checkpoint}: not a best-model checkpoint (use best.pt)")
    if info.get("family") != FAMILY:
        raise InputError(f"{checkpoint}: not a checkpoint of a cluster-family model")
    spec = ModelSpec.from_dict(saved["spec"])
    seed = int(saved["seed"])
    last_row = saved.get("last_row")
    if spec.kind == "cluster_moe" and "train_dispatch_entropy" not in (last_row or {}):
        raise InputError(
            f"{checkpoint}: holds no last history row with the training dispatch entropy "
            "(the published figure); it was written by an older version: train it again"
        )
    train = _open_train(train_store)
    trained_on = (saved.get("data_provenance") or {}).get("train") or {}
    provenance = cluster_provenance(train)
    if provenance != trained_on:
        change = describe_difference(trained_on, provenance)
        raise InputError(
            f"train store {_describe(train)} is not the data the model of {str(checkpoint)!r} "
            f"was trained on ({info.get('train_store')}; {change})"
        )
    test = open_cluster_split(test_store)
    if test.split != "test":
        raise InputError(
            f"store {_describe(test)} is not a test split; evaluate on the test store of "
            f"train store {_describe(train)}"
        )
    if not _same_data_set(train, test):
        raise InputError(
            f"test store {_describe(test)} does not come from the setting and generating "
            f"vectors of train store {_describe(train)}; both must be made with one setting "
            f"and seed"
        )
    train_index, val_index = carve_validation(len(train), info["val_fraction"], train.seed)
    if _indices_digest(val_index) != info["val_indices_sha256"]:
        raise InputError(
            f"{checkpoint}: the validation part of {str(train_store)!r} cannot be carved again "
            f"as in training (another numpy version?)"
        )
    device = resolve_device(spec.train["device"])
    model = build_cluster_model(spec.kind, spec.options, info["dim"])
    model.load_state_dict(saved["model"])
    model.to(device=device, dtype=torch.float32)
    clusters = int(info["clusters"])

    def scored(data: ClusterData) -> tuple[np.ndarray, np.ndarray | None]:
        x = torch.from_numpy(data.x).to(device)
        logits, dispatch = routed_logits(model, x, seed)
        return logits.cpu().numpy(), None if dispatch is None else dispatch.cpu().numpy()

    train_logits, train_dispatch = scored(train)
    test_logits, test_dispatch = scored(test)
    metrics: dict[str, Any] = {
        "test_accuracy": accuracy(test_logits, test.label),
        "train_accuracy": accuracy(train_logits[train_index], train.label[train_index]),
        "val_accuracy": accuracy(train_logits[val_index], train.label[val_index]),
        "dispatch_entropy": None,
        "dispatch_entropy_eval": None,
        "test_dispatch_entropy": None,
    }
    dispatch = None
    moe = isinstance(model, ClusterMoE)
    if moe:
        experts = model.num_experts
        train_counts = dispatch_matrix(train_dispatch, train.cluster, experts, clusters)
        test_counts = dispatch_matrix(test_dispatch, test.cluster, experts, clusters)
        metrics["dispatch_entropy"] = float(last_row["train_dispatch_entropy"])
        metrics["dispatch_entropy_eval"] = dispatch_entropy(train_counts)
        metrics["test_dispatch_entropy"] = dispatch_entropy(test_counts)
        dispatch = {
            "train": train_counts.tolist(),
            "test": test_counts.tolist(),
            "experts": experts,
            "clusters": clusters,
        }
    expert = model.experts[0] if moe else model
    assert isinstance(expert, PatchCNN)
    return {
        "family": FAMILY,
        "setting": train.setting.name,
        "model": spec.name,
        "kind": spec.kind,
        "seed": seed,
        "activation": expert.activation,
        "experts": model.num_experts if moe else None,
        "filters": expert.filters_per_class * expert.classes,
        "params": parameter_count(model),
        "best_epoch": int(saved["epoch"]),
        "epochs": int(saved["epochs"]),
        "train_time_s": float(saved["train_time_s"]),
        "stop_reason": str(saved.get("stop_reason") or ""),
        "train_samples": int(train_index.size),
        "val_samples": int(val_index.size),
        "test_noise": bool(moe and model.test_noise),
        "device": str(device),
        "precision": "fp32",
        "metrics": metrics,
        "dispatch": dispatch,
        "store": str(test_store),
        "train_store": str(train_store),
    }


def run_cluster_seeds(
    spec: ModelSpec | Mapping[str, Any],
    train_store: str | Path,
    test_store: str | Path,
    seeds: list[int],
    models_dir: str | Path,
    metrics_dir: str | Path,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train and evaluate one model for every seed in one process: ``<models_dir>/seed<k>/``
    gets what :func:`train_cluster` writes, ``<metrics_dir>/seed<k>.json`` the test metrics.

    A full-batch training of this family takes seconds, so starting Python and PyTorch once
    per seed (and once more per evaluation) would cost about as much as the training itself:
    the workflow runs one job per setting and model instead of one per seed. Each seed keeps
    its own folder, checkpoints and resume, exactly as if it had been trained alone.
    """
    results = []
    for seed in seeds:
        out = Path(models_dir) / f"seed{seed}"
        train_cluster(spec, train_store, seed, out, progress)
        result = evaluate_cluster_checkpoint(out / "best.pt", test_store, train_store)
        write_json(result, Path(metrics_dir) / f"seed{seed}.json")
        results.append(result)
    return results
