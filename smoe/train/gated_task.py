"""The gated-modular-network family (Krishnamurthy et al., arXiv 2302.14703) through the
shared trainer.

:class:`GatedTask` is what this family gives :class:`smoe.train.loop.TaskTrainer`; seeding,
checkpoints, resuming, history, best-epoch selection and the summary are the trainer's.
:func:`train_gated` trains one model with one seed, :func:`evaluate_gated_checkpoint` scores
its ``best.pt`` on a test store.

Training: minibatches (``batch_size`` 512) of images scaled to [0, 1] float32, shuffled by
the trainer's seeded generator, Adam (lr 1e-3, weight decay 1e-3), the variant's
:func:`smoe.models.gated.gated_loss` plus the model options' regularisers (``importance:
w`` adds :func:`importance_loss`, ``similarity: {beta_s, beta_d, features}`` adds
:func:`sample_similarity_loss`, on pixel distances or, with ``features`` (the path of a
trained ``gated_single``'s ``best.pt``), on distances between that network's last hidden
features; both off by default). The stochastic variant draws its
training routes from the trainer's generator too, so a resumed run draws what an
uninterrupted one would. Validation on the val store: ``val_accuracy`` (percent),
``val_loss`` and, for the MoE, ``val_usage_entropy`` and ``val_sample_entropy`` (bits); the
epoch of best ``val_accuracy`` is kept (ties: the earlier).

Kinds (:data:`GATED_KINDS`) and their options:

* ``gated_moe``: ``experts`` (10), ``variant`` (expectation), ``top_k`` (1), ``attentive``
  (false), ``temperature`` (1.0), ``importance`` (null), ``similarity`` (null);
* ``gated_single``: ``params_budget`` (``"match"``: the parameter count of the MoE of the
  options ``experts`` (10) and ``attentive`` (false) for the same input) ;
* ``gated_distilled``: ``teacher`` (path of a trained MoE's ``best.pt``, typically an
  attentive one), ``variant`` and ``top_k`` (null: the teacher's), ``importance``,
  ``similarity``: a plain gate trained on the teacher's frozen experts
  (:func:`smoe.models.gated.distill_gate`); only the gate's parameters are optimised.

Evaluation predicts as the model does in evaluation mode (the mixture for expectation /
top-k, the argmax expert's output for stochastic / em) and routes every sample to the
argmax of p(.|x) for the routing matrix and the mutual information.

Train settings (``spec.train``; :data:`TRAIN_DEFAULTS`): ``epochs`` 100, ``batch_size`` 512,
``lr`` 1e-3, ``weight_decay`` 1e-3, ``select`` ``{metric: val_accuracy, mode: max}``,
``device`` ``cpu`` | ``cuda`` | ``auto``, ``precision`` (``fp32`` only), ``threads`` 1,
``deterministic`` true, ``progress`` true, ``checkpoint_every`` 1, ``stop_at`` and
``early_stop`` (null: off). ``progress`` and ``checkpoint_every`` change no result.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from smoe.config import ModelSpec
from smoe.data.image_store import ImageData, open_image_split
from smoe.data.images import CLASSES
from smoe.errors import InputError
from smoe.models.gated import (
    VARIANTS,
    GatedMoE,
    SingleModel,
    distill_gate,
    gated_loss,
    importance_loss,
    moe_parameter_count,
    parameter_count,
    sample_similarity_loss,
    trainable_parameters,
)
from smoe.train import distributed
from smoe.train.checkpoint import load_checkpoint
from smoe.train.device import resolve_device
from smoe.train.evaluate import write_json
from smoe.train.gated_metrics import (
    accuracy,
    mutual_information,
    per_task_entropy,
    routing_matrix,
    sample_entropy,
    usage_entropy,
)
from smoe.train.loop import TaskTrainer, TrainingError, TrainingTask

__all__ = [
    "GATED_KINDS",
    "gated_label",
    "GatedTask",
    "TRAIN_DEFAULTS",
    "build_gated_model",
    "evaluate_gated_checkpoint",
    "resolve_gated_spec",
    "run_gated_seeds",
    "seed_options",
    "train_gated",
    "write_json",
]

FAMILY = "gated"
GATED_KINDS = ("gated_moe", "gated_single", "gated_distilled")

TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 100,
    "batch_size": 512,
    "lr": 1e-3,
    "weight_decay": 1e-3,
    "select": {"metric": "val_accuracy", "mode": "max"},
    "device": "cpu",
    "precision": "fp32",
    "threads": 1,
    "deterministic": True,
    "progress": True,
    "stop_at": None,
    "early_stop": None,
    "checkpoint_every": 1,
    "processes": 1,
}
"""Every train setting of the gated family with its default (the paper's where it has one)."""

MOE_OPTIONS: dict[str, Any] = {
    "experts": 10,
    "variant": "expectation",
    "top_k": 1,
    "attentive": False,
    "temperature": 1.0,
    "importance": None,
    "similarity": None,
}
SINGLE_OPTIONS: dict[str, Any] = {"params_budget": "match", "experts": 10, "attentive": False}
DISTILLED_OPTIONS: dict[str, Any] = {
    "teacher": None,
    "variant": None,
    "top_k": None,
    "importance": None,
    "similarity": None,
}
OPTIONS = {"gated_moe": MOE_OPTIONS, "gated_single": SINGLE_OPTIONS}
OPTIONS["gated_distilled"] = DISTILLED_OPTIONS

SIMILARITY_KEYS = {"beta_s", "beta_d", "features"}

NOT_IDENTITY = ("progress", "checkpoint_every", "processes")
"""Train settings that cannot change a result, so a ``last.pt`` is resumed across them."""

EVAL_BATCH = 2048


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _options(kind: str, options: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """The options of ``kind`` with defaults filled in; unknown keys and bad regularisers
    raise InputError."""
    known = OPTIONS[kind]
    given = dict(options or {})
    for key in given:
        if key not in known:
            raise InputError(
                f"{where}: option {key!r} is not an option of {kind}; known: {', '.join(known)}"
            )
    merged = {**copy.deepcopy(known), **given}
    weight = merged.get("importance")
    if weight is not None and (not _is_number(weight) or weight < 0):
        raise InputError(
            f"{where}: option importance must be a number >= 0 or null, got {weight!r}"
        )
    similarity = merged.get("similarity")
    if similarity is not None:
        if not isinstance(similarity, Mapping) or set(similarity) - SIMILARITY_KEYS:
            raise InputError(
                f"{where}: option similarity must be a mapping of beta_s, beta_d and "
                f"features, got {similarity!r}"
            )
        for key in ("beta_s", "beta_d"):
            if not _is_number(similarity.get(key, 0.0)):
                raise InputError(f"{where}: option similarity.{key} must be a number")
        features = similarity.get("features")
        if features is not None and not isinstance(features, str | Path):
            raise InputError(
                f"{where}: option similarity.features must be null (pixel distances) or the "
                f"path of a trained gated_single's best.pt, got {features!r}"
            )
    return merged


def _feature_network(path: Any, where: str) -> tuple[dict[str, Any], SingleModel]:
    """A trained single network whose last hidden layer measures sample distances."""
    saved = load_checkpoint(Path(path))
    info = saved.get("data") or {}
    arch = info.get("architecture") or {}
    if info.get("family") != FAMILY or arch.get("type") != "single" or "val_metrics" not in saved:
        raise InputError(
            f"{where}: similarity.features {str(path)!r} is not the best.pt of a trained "
            "gated_single"
        )
    model = rebuild(arch)
    model.load_state_dict(saved["model"])
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return saved, model


def _weights_record(saved: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a checkpoint another model builds on: its spec, seed, epoch and a
    digest of its weights (a retrained teacher makes its students retrain)."""
    digest = hashlib.sha256()
    for key in sorted(saved["model"]):
        digest.update(key.encode())
        digest.update(saved["model"][key].cpu().numpy().tobytes())
    return {
        "spec": saved.get("spec"),
        "seed": saved.get("seed"),
        "epoch": saved.get("epoch"),
        "weights_sha256": digest.hexdigest(),
    }


@torch.no_grad()
def feature_distances(network: SingleModel, x: torch.Tensor) -> torch.Tensor:
    """D_ij = ||h(x_i) - h(x_j)|| / max over the batch, h the network's 32-d last hidden
    layer: the sample-similarity loss's distances measured in a trained network's features."""
    features = network.net(x)[1]
    distances = torch.cdist(features, features)
    top = distances.max()
    return distances / top if top > 0 else distances


def _teacher(path: Any, where: str) -> tuple[dict[str, Any], GatedMoE]:
    """A trained MoE's checkpoint and model, from the ``teacher`` option."""
    if not isinstance(path, str | Path):
        raise InputError(f"{where}: option teacher must be the path of a gated MoE's best.pt")
    saved = load_checkpoint(Path(path))
    info = saved.get("data") or {}
    arch = info.get("architecture") or {}
    if info.get("family") != FAMILY or arch.get("type") != "moe" or "val_metrics" not in saved:
        raise InputError(
            f"{where}: teacher {str(path)!r} is not the best.pt of a trained gated MoE"
        )
    model = GatedMoE(**_moe_args(arch["args"]))
    model.load_state_dict(saved["model"])
    return saved, model


def _moe_args(args: Mapping[str, Any]) -> dict[str, Any]:
    args = dict(args)
    args["in_shape"] = tuple(args["in_shape"])
    return args


def build_gated_model(
    kind: str, options: Mapping[str, Any] | None, in_shape: tuple[int, ...], classes: int
) -> nn.Module:
    """The model of ``kind`` with ``options`` (see the module docstring) for images of
    ``in_shape`` (C, H, W) and ``classes`` classes. ``gated_distilled`` reads its teacher."""
    where = f"kind {kind}"
    if kind not in GATED_KINDS:
        raise InputError(f"kind {kind!r} is not a gated model; known: {', '.join(GATED_KINDS)}")
    opts = _options(kind, options, where)
    in_shape = tuple(int(n) for n in in_shape)
    if kind == "gated_moe":
        return GatedMoE(
            in_shape,
            classes,
            experts=opts["experts"],
            variant=opts["variant"],
            top_k=opts["top_k"],
            attentive=opts["attentive"],
            temperature=opts["temperature"],
        )
    if kind == "gated_single":
        budget = opts["params_budget"]
        if budget == "match":
            budget = moe_parameter_count(
                in_shape, classes, experts=opts["experts"], attentive=opts["attentive"]
            )
        return SingleModel(in_shape, classes, budget)
    _, teacher = _teacher(opts["teacher"], where)
    if tuple(teacher.in_shape) != in_shape or teacher.classes != classes:
        raise InputError(
            f"{where}: teacher {opts['teacher']!r} was trained on images {teacher.in_shape} "
            f"of {teacher.classes} classes, these are {in_shape} of {classes}"
        )
    if opts["variant"] is not None and opts["variant"] not in VARIANTS:
        raise InputError(f"{where}: unknown variant {opts['variant']!r}")
    return distill_gate(teacher, variant=opts["variant"], top_k=opts["top_k"])


def architecture(model: nn.Module) -> dict[str, Any]:
    """How to rebuild ``model`` without its options (a distilled one without its teacher)."""
    if isinstance(model, GatedMoE):
        return {
            "type": "moe",
            "args": {
                "in_shape": list(model.in_shape),
                "classes": model.classes,
                "experts": model.n_experts,
                "variant": model.variant,
                "top_k": model.top_k,
                "attentive": model.attentive,
                "temperature": model.temperature,
            },
        }
    assert isinstance(model, SingleModel)
    trunk = model.net.trunk
    return {
        "type": "single",
        "args": {
            "in_shape": list(trunk.in_shape),
            "classes": model.net.out.out_features,
            "params_budget": parameter_count(model),
        },
    }


def rebuild(arch: Mapping[str, Any]) -> nn.Module:
    if arch["type"] == "moe":
        return GatedMoE(**_moe_args(arch["args"]))
    args = arch["args"]
    return SingleModel(tuple(args["in_shape"]), args["classes"], args["params_budget"])


# -- specs -------------------------------------------------------------------------------


def gated_label(kind: str, options: Mapping[str, Any], teacher_attentive: bool = False) -> str:
    """The paper's name of a configured model, e.g. ``top-2 + L_imp``, ``attentive
    stochastic``, ``distilled attentive + L_imp`` or ``single``: the key that puts the
    published figure beside ours, whatever the model is called in the config."""
    if kind == "gated_single":
        return "single"
    defaults = MOE_OPTIONS if kind == "gated_moe" else DISTILLED_OPTIONS
    opts = {**defaults, **dict(options or {})}
    if kind == "gated_distilled":
        name = "distilled attentive" if teacher_attentive else "distilled"
    else:
        variant, top_k = opts["variant"], opts["top_k"]
        name = {"expectation": "expectation", "stochastic": "stochastic", "em": "EM"}.get(
            variant, f"top-{top_k}"
        )
        if opts["attentive"]:
            name = f"attentive {name}"
    if opts.get("importance"):
        name += " + L_imp"
    if opts.get("similarity"):
        name += " + L_s"
    return name


def _check_settings(name: str, train: dict[str, Any]) -> None:
    where = f"model {name!r}: train"
    for key in ("epochs", "batch_size", "checkpoint_every", "processes"):
        value = train[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{where}.{key} must be a positive integer, got {value!r}")
    for key in ("lr", "weight_decay"):
        if not _is_number(train[key]) or train[key] < 0:
            raise InputError(f"{where}.{key} must be a number >= 0, got {train[key]!r}")
    if train["stop_at"] is not None and not _is_number(train["stop_at"]):
        raise InputError(f"{where}.stop_at must be a number or null, got {train['stop_at']!r}")
    early = train["early_stop"]
    if early is not None and (isinstance(early, bool) or not isinstance(early, int) or early < 0):
        raise InputError(f"{where}.early_stop must be an integer >= 0 or null, got {early!r}")
    if train["device"] not in ("cpu", "cuda", "auto"):
        raise InputError(f"{where}.device must be cpu, cuda or auto, got {train['device']!r}")
    if train["precision"] != "fp32":
        raise InputError(f"{where}.precision must be fp32, got {train['precision']!r}")
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
        raise InputError(f"{where}.select must hold a metric name and mode min or max")


def resolve_gated_spec(spec: ModelSpec | Mapping[str, Any]) -> ModelSpec:
    """The spec with every train default filled in and checked (InputError naming the key).
    A mapping may leave out ``options``, ``train``, ``data`` and ``evaluate``."""
    if isinstance(spec, ModelSpec):
        spec = spec.to_dict()
    if not isinstance(spec, Mapping):
        raise InputError(f"a model spec must be a mapping, got {type(spec).__name__}")
    for key in ("name", "kind"):
        if not isinstance(spec.get(key), str):
            raise InputError(f"model spec: {key} must be a string, got {spec.get(key)!r}")
    name, kind = spec["name"], spec["kind"]
    if kind not in GATED_KINDS:
        raise InputError(
            f"model {name!r}: kind {kind!r} is not a gated model; known: {', '.join(GATED_KINDS)}"
        )
    sections = {}
    for key in ("options", "train", "data", "evaluate"):
        value = spec.get(key) or {}
        if not isinstance(value, Mapping):
            raise InputError(f"model {name!r}: {key} must be a mapping, got {value!r}")
        sections[key] = copy.deepcopy(dict(value))
    for section, known in (("train", TRAIN_DEFAULTS), ("data", {}), ("evaluate", {})):
        for key in sections[section]:
            if key not in known:
                raise InputError(
                    f"model {name!r}: {section}.{key} is not a setting of the gated family; "
                    f"known: {', '.join(known) or 'none'}"
                )
    given = sections["train"]
    select = given.pop("select", None) or {}
    if not isinstance(select, Mapping):
        raise InputError(f"model {name!r}: train.select must be a mapping, got {select!r}")
    train = {**copy.deepcopy(TRAIN_DEFAULTS), **given}
    train["select"] = {**TRAIN_DEFAULTS["select"], **select}
    _check_settings(name, train)
    options = _options(kind, sections["options"], f"model {name!r}")
    if kind == "gated_distilled":
        if not isinstance(options["teacher"], str) or not options["teacher"]:
            raise InputError(
                f"model {name!r}: option teacher must be the path of a trained gated MoE's "
                f"best.pt, got {options['teacher']!r}"
            )
        if options["variant"] is not None and options["variant"] not in VARIANTS:
            raise InputError(
                f"model {name!r}: unknown variant {options['variant']!r}; valid: "
                f"{', '.join(VARIANTS)}"
            )
    else:  # options checked on a small stand-in input before any work
        try:
            build_gated_model(kind, sections["options"], (1, 8, 8), CLASSES)
        except InputError as exc:
            raise InputError(f"model {name!r}: {exc}") from exc
    return ModelSpec(name, kind, sections["options"], train, sections["data"], sections["evaluate"])


# -- data --------------------------------------------------------------------------------


def image_tensor(data: ImageData) -> torch.Tensor:
    """Images as float32 [N, C, H, W] in [0, 1]."""
    x = torch.from_numpy(data.image.astype(np.float32) / 255.0)
    if x.dim() == 3:
        return x.unsqueeze(1)
    return x.permute(0, 3, 1, 2).contiguous()


def _open(path: Path, split: str) -> ImageData:
    data = open_image_split(path)
    if data.split != split:
        raise InputError(f"store {str(path)!r} holds the {data.split} split, not {split}")
    return data


@torch.no_grad()
def gated_outputs(model: nn.Module, x: torch.Tensor, batch: int = EVAL_BATCH) -> dict[str, Any]:
    """Evaluation-mode outputs on ``x`` in batches: ``log_probs`` [N, C] and for the MoE
    ``p`` [N, E], ``choice`` (argmax of p) and ``expert_pred`` (the chosen expert's class)."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    try:
        for start in range(0, x.shape[0], batch):
            out = model(x[start : start + batch])
            if isinstance(out, torch.Tensor):
                parts.setdefault("log_probs", []).append(out.float())
                continue
            rows = torch.arange(out["choice"].shape[0], device=x.device)
            chosen = out["expert_log_probs"][rows, out["choice"]]
            for key, value in (
                ("log_probs", out["log_probs"].float()),
                ("p", out["p"].float()),
                ("choice", out["choice"]),
                ("expert_pred", chosen.argmax(dim=-1)),
            ):
                parts.setdefault(key, []).append(value)
    finally:
        model.train(was_training)
    return {key: torch.cat(values) for key, values in parts.items()}


class GatedTask(TrainingTask):
    """The gated-modular-network family's part of training; see the module docstring.
    Trains on several processes under ``torchrun`` too (:meth:`_train_epoch_shared`)."""

    multi_process = True

    def __init__(
        self, spec: ModelSpec | Mapping[str, Any], train_store: str | Path, val_store: str | Path
    ) -> None:
        super().__init__(resolve_gated_spec(spec))
        self.train_store, self.val_store = Path(train_store), Path(val_store)
        self.checkpoint_every = self.settings["checkpoint_every"]
        self.options = _options(self.spec.kind, self.spec.options, f"model {self.spec.name!r}")

    def load(self, device: torch.device) -> None:
        train, val = _open(self.train_store, "train"), _open(self.val_store, "val")
        if train.image.shape[1:] != val.image.shape[1:] or train.dataset != val.dataset:
            raise InputError(
                f"stores {str(self.train_store)!r} and {str(self.val_store)!r} hold different "
                f"data sets or image shapes"
            )
        self.train_data, self.val_data = train, val
        self.x, self.y = image_tensor(train).to(device), torch.from_numpy(train.label).to(device)
        self.val_x = image_tensor(val).to(device)
        self.val_y = torch.from_numpy(val.label).to(device)
        self.in_shape = tuple(int(n) for n in self.x.shape[1:])
        self.provenance = {"train": train.provenance, "val": val.provenance}
        where = f"model {self.spec.name!r}"
        if self.spec.kind == "gated_distilled":
            saved, _ = _teacher(self.options["teacher"], where)
            self.provenance["teacher"] = _weights_record(saved)
        self.features = None
        features = (self.options.get("similarity") or {}).get("features")
        if features is not None:
            saved, network = _feature_network(features, where)
            if tuple(network.net.trunk.in_shape) != self.in_shape:
                raise InputError(
                    f"{where}: similarity.features {str(features)!r} was trained on images "
                    f"{tuple(network.net.trunk.in_shape)}, these are {self.in_shape}"
                )
            self.features = network.to(device)
            self.provenance["features"] = _weights_record(saved)

    def build_model(self) -> nn.Module:
        model = build_gated_model(self.spec.kind, self.spec.options, self.in_shape, CLASSES)
        self.architecture = architecture(model)
        return model

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            trainable_parameters(model),
            lr=self.settings["lr"],
            weight_decay=self.settings["weight_decay"],
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
        return {
            "family": FAMILY,
            "dataset": self.train_data.dataset,
            "in_shape": list(self.in_shape),
            "classes": CLASSES,
            "architecture": self.architecture,
            "train_store": str(self.train_store),
            "val_store": str(self.val_store),
            "train_samples": len(self.train_data),
            "val_samples": len(self.val_data),
        }

    def summary_info(self) -> dict[str, Any]:
        return {
            "family": FAMILY,
            "dataset": self.train_data.dataset,
            "train_samples": len(self.train_data),
            "val_samples": len(self.val_data),
        }

    # -- one epoch -----------------------------------------------------------------------
    def train_epoch(self, trainer: TaskTrainer, epoch: int) -> dict[str, float]:
        if trainer.world.multi:
            return self._train_epoch_shared(trainer, epoch)
        model, optimizer = trainer.model, trainer.optimizer
        model.train()
        moe = isinstance(model, GatedMoE)
        if moe:
            model.generator = trainer.generator  # stochastic routes: seeded, checkpointed
        weight = self.options.get("importance")
        similarity = self.options.get("similarity")
        n = self.x.shape[0]
        order = torch.randperm(n, generator=trainer.generator).to(self.x.device)
        totals = {"loss": 0.0, "importance": 0.0, "similarity": 0.0}
        correct, steps = 0, 0
        for start in range(0, n, self.settings["batch_size"]):
            index = order[start : start + self.settings["batch_size"]]
            x, y = self.x[index], self.y[index]
            out = model(x)
            if moe:
                loss = gated_loss(out, y, model.variant)
                log_probs = out["log_probs"]
            else:
                log_probs = out
                loss = torch.nn.functional.nll_loss(out, y)
            total = loss
            if moe and weight:
                imp = importance_loss(out["p"], weight)
                total = total + imp
                totals["importance"] += float(imp.detach())
            if moe and similarity:
                distances = None
                if self.features is not None:
                    distances = feature_distances(self.features, x)
                sim = sample_similarity_loss(
                    out["p"],
                    x,
                    similarity.get("beta_s", 0.0),
                    similarity.get("beta_d", 0.0),
                    distances,
                )
                total = total + sim
                totals["similarity"] += float(sim.detach())
            value = float(total.detach())
            if not math.isfinite(value):
                raise TrainingError(
                    f"model {self.spec.name!r}: the loss became non-finite (NaN or Inf) at "
                    f"epoch {epoch}, step {steps}; lower train.lr or check the data"
                )
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            totals["loss"] += float(loss.detach())
            correct += int((log_probs.detach().argmax(dim=-1) == y).sum())
            steps += 1
        row = {"train_loss": totals["loss"] / steps, "train_accuracy": 100.0 * correct / n}
        if moe and weight:
            row["train_importance"] = totals["importance"] / steps
        if moe and similarity:
            row["train_similarity"] = totals["similarity"] / steps
        return row

    def _train_epoch_shared(self, trainer: TaskTrainer, epoch: int) -> dict[str, float]:
        """One epoch on this process's share of every global minibatch (under torchrun),
        with the results of :meth:`train_epoch` in one process (to float rounding).

        Every process draws the same batch order; the mean losses are weighted by the share
        (DDP averages the gradients); what is computed over the whole batch sees the whole
        batch: the regularisers get every process's p(.|x) (the others' as constants, this
        share's with its gradient, so the summed gradient is the whole batch's), and the
        stochastic variant's routes are drawn on the whole batch's p from the trainer's
        generator, as one process draws them.
        """
        model, optimizer, world = trainer.model, trainer.optimizer, trainer.world
        net = trainer.train_model
        model.train()
        moe = isinstance(model, GatedMoE)
        stochastic = moe and model.variant == "stochastic"
        if moe:  # the model's own draws are redone below on the whole batch
            model.generator = torch.Generator(device=self.x.device).manual_seed(0)
        weight = self.options.get("importance")
        similarity = self.options.get("similarity")
        gather = moe and bool(weight or similarity or stochastic)
        n, batch_size = self.x.shape[0], self.settings["batch_size"]
        distributed.check_batches(n, batch_size, world, f"model {self.spec.name!r}")
        order = torch.randperm(n, generator=trainer.generator).to(self.x.device)
        sums = torch.zeros(2, dtype=torch.float64)  # share-weighted loss, correct
        totals = {"importance": 0.0, "similarity": 0.0}
        steps = 0
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            low, high = distributed.share(len(index), world)
            x, y = self.x[index[low:high]], self.y[index[low:high]]
            share = (high - low) / len(index)
            out = net(x)
            if moe:
                loss = gated_loss(out, y, model.variant)
                log_probs = out["log_probs"]
            else:
                log_probs = out
                loss = torch.nn.functional.nll_loss(out, y)
            total = loss * (share * world.size)
            if gather:
                sizes = distributed.share_sizes(len(index), world.size)
                p_all = distributed.gather_rows(out["p"].detach(), sizes)
                p = torch.cat([p_all[:low], out["p"], p_all[high:]])
            if stochastic:
                choice = torch.multinomial(p_all, 1, generator=trainer.generator).squeeze(1)
                rows = torch.arange(high - low, device=x.device)
                log_probs = out["expert_log_probs"][rows, choice[low:high]]
            if moe and weight:
                imp = importance_loss(p, weight)
                total = total + imp * world.size
                totals["importance"] += float(imp.detach())
            if moe and similarity:
                x_all = self.x[index]
                distances = None
                if self.features is not None:
                    distances = feature_distances(self.features, x_all)
                sim = sample_similarity_loss(
                    p,
                    x_all,
                    similarity.get("beta_s", 0.0),
                    similarity.get("beta_d", 0.0),
                    distances,
                )
                total = total + sim * world.size
                totals["similarity"] += float(sim.detach())
            if not math.isfinite(float(total.detach())):
                raise TrainingError(
                    f"model {self.spec.name!r}: the loss became non-finite (NaN or Inf) at "
                    f"epoch {epoch}, step {steps}; lower train.lr or check the data"
                )
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            sums[0] += float(loss.detach()) * share
            sums[1] += int((log_probs.detach().argmax(dim=-1) == y).sum())
            steps += 1
        sums = distributed.all_reduce_sum(sums.to(self.x.device)).cpu()
        row = {"train_loss": float(sums[0]) / steps, "train_accuracy": 100.0 * float(sums[1]) / n}
        if moe and weight:
            row["train_importance"] = totals["importance"] / steps
        if moe and similarity:
            row["train_similarity"] = totals["similarity"] / steps
        return row

    def validate(self, trainer: TaskTrainer) -> dict[str, float]:
        model = trainer.model
        out = gated_outputs(model, self.val_x)
        metrics = {
            "val_accuracy": accuracy(out["log_probs"], self.val_y),
            "val_loss": float(torch.nn.functional.nll_loss(out["log_probs"], self.val_y)),
        }
        if "p" in out:
            metrics["val_usage_entropy"] = usage_entropy(out["p"])
            metrics["val_sample_entropy"] = sample_entropy(out["p"])
        return metrics


# -- entry points ------------------------------------------------------------------------


def train_gated(
    spec: ModelSpec | Mapping[str, Any],
    train_store: str | Path,
    val_store: str | Path,
    seed: int,
    out_dir: str | Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one gated-family model with one seed into ``out_dir`` (``best.pt``, ``last.pt``,
    ``history.csv``, ``train.json``); returns the ``train.json`` summary."""
    task = GatedTask(spec, train_store, val_store)
    show = progress and task.settings["progress"]
    return TaskTrainer(task, seed, out_dir, show).run()


def evaluate_gated_checkpoint(checkpoint: str | Path, test_store: str | Path) -> dict[str, Any]:
    """Scores of a gated model's ``best.pt`` on a test store (one float32 pass in evaluation
    mode): test accuracy (percent) and, for MoEs, the specialisation metrics in bits and the
    routing matrix (counts [experts, classes]), every sample routed to the argmax of p(.|x).
    The test store must hold the data set and image shape the model was trained on."""
    checkpoint, test_store = Path(checkpoint), Path(test_store)
    saved = load_checkpoint(checkpoint)
    info = saved.get("data") or {}
    if "val_metrics" not in saved:
        raise InputError(f"{checkpoint}: not a best-model checkpoint (use best.pt)")
    if info.get("family") != FAMILY:
        raise InputError(f"{checkpoint}: not a checkpoint of a gated-family model")
    spec = ModelSpec.from_dict(saved["spec"])
    test = _open(test_store, "test")
    if test.dataset != info["dataset"] or list(test.image.shape[1:]) != list(
        _stored_shape(info["in_shape"])
    ):
        raise InputError(
            f"test store {str(test_store)!r} holds {test.dataset} images of shape "
            f"{list(test.image.shape[1:])}; the model of {str(checkpoint)!r} was trained on "
            f"{info['dataset']} images of shape (C, H, W) {info['in_shape']}"
        )
    device = resolve_device(spec.train["device"])
    model = rebuild(info["architecture"])
    model.load_state_dict(saved["model"])
    model.to(device=device, dtype=torch.float32)
    x, labels = image_tensor(test).to(device), test.label
    out = {k: v.cpu().numpy() for k, v in gated_outputs(model, x).items()}
    classes = int(info["classes"])
    metrics: dict[str, Any] = {
        "test_accuracy": accuracy(out["log_probs"], labels),
        "mutual_information": None,
        "sample_entropy": None,
        "usage_entropy": None,
        "per_task_entropy": None,
    }
    routing, variant, experts, top_k, attentive = None, None, None, None, None
    if isinstance(model, GatedMoE):
        experts, variant = model.n_experts, model.variant
        top_k, attentive = model.top_k, model.attentive
        metrics["mutual_information"] = mutual_information(
            out["choice"], out["expert_pred"], experts, classes
        )
        metrics["sample_entropy"] = sample_entropy(out["p"])
        metrics["usage_entropy"] = usage_entropy(out["p"])
        metrics["per_task_entropy"] = per_task_entropy(out["p"], labels)
        counts = routing_matrix(out["choice"], labels, experts, classes)
        routing = {"matrix": counts.tolist(), "experts": experts, "classes": classes}
    return {
        "family": FAMILY,
        "dataset": info["dataset"],
        "model": spec.name,
        "kind": spec.kind,
        "label": gated_label(spec.kind, spec.options, _teacher_attentive(saved)),
        "options": spec.options,
        "variant": variant,
        "top_k": top_k,
        "attentive": attentive,
        "experts": experts,
        "seed": int(saved["seed"]),
        "params": parameter_count(model),
        "best_epoch": int(saved["epoch"]),
        "epochs": int(saved["epochs"]),
        "train_time_s": float(saved["train_time_s"]),
        "device": str(device),
        "routing_rule": "argmax",
        "metrics": metrics,
        "routing": routing,
        "store": str(test_store),
        "train_store": info["train_store"],
        "val_store": info["val_store"],
    }


def _teacher_attentive(saved: Mapping[str, Any]) -> bool:
    """Whether a distilled model's teacher had the attentive gate (from its provenance)."""
    teacher = (saved.get("data_provenance") or {}).get("teacher") or {}
    options = (teacher.get("spec") or {}).get("options") or {}
    return bool(options.get("attentive"))


def _stored_shape(in_shape: list[int]) -> list[int]:
    """The store's image shape of a model input (C, H, W): (H, W) grey, (H, W, C) colour."""
    channels, height, width = in_shape
    return [height, width] if channels == 1 else [height, width, channels]


def seed_options(
    spec: ModelSpec | Mapping[str, Any],
    seed: int,
    teacher_dir: str | Path | None = None,
    features_dir: str | Path | None = None,
) -> ModelSpec:
    """``spec`` with the models it builds on resolved for ``seed``: in a workflow config a
    distilled model's ``teacher`` and a similarity loss's ``features`` name other models,
    and seed k builds on their seed k, ``<dir>/seed<k>/best.pt``."""
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(dict(spec))
    options = copy.deepcopy(spec.options)
    if teacher_dir is not None:
        options["teacher"] = str(Path(teacher_dir) / f"seed{seed}" / "best.pt")
    if features_dir is not None:
        similarity = dict(options.get("similarity") or {})
        similarity["features"] = str(Path(features_dir) / f"seed{seed}" / "best.pt")
        options["similarity"] = similarity
    return ModelSpec(spec.name, spec.kind, options, spec.train, spec.data, spec.evaluate)


def run_gated_seeds(
    spec: ModelSpec | Mapping[str, Any],
    stores: Mapping[str, str | Path],
    seeds: list[int],
    models_dir: str | Path,
    metrics_dir: str | Path,
    teacher_dir: str | Path | None = None,
    features_dir: str | Path | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train and evaluate one model for every seed in one process: ``<models_dir>/seed<k>/``
    gets what :func:`train_gated` writes, ``<metrics_dir>/seed<k>.json`` the test metrics
    (``stores``: ``train``, ``val`` and ``test``).

    On digits a training takes seconds, about what starting Python and PyTorch takes, so the
    workflow runs one job per model rather than per seed; each seed keeps its own folder,
    checkpoints and resume, exactly as if it had been trained alone.
    """
    specs = [seed_options(spec, seed, teacher_dir, features_dir) for seed in seeds]
    for resolved in specs:  # every seed's options checked before the first trains
        resolve_gated_spec(resolved)
    results = []
    for seed, resolved in zip(seeds, specs, strict=True):
        out = Path(models_dir) / f"seed{seed}"
        train_gated(resolved, stores["train"], stores["val"], seed, out, progress)
        result = evaluate_gated_checkpoint(out / "best.pt", stores["test"])
        if distributed.is_main():  # under torchrun every process evaluates, rank 0 writes
            write_json(result, Path(metrics_dir) / f"seed{seed}.json")
        results.append(result)
    return results
