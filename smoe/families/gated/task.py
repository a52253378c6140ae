"""The gated-modular-network family (Krishnamurthy et al., arXiv 2302.14703) through the
shared trainer, as the official code trains and evaluates it.

:class:`GatedTask` is what this family gives :class:`smoe.core.train.loop.TaskTrainer`; seeding,
checkpoints, resuming, history, the kept epoch and the summary are the trainer's.
:func:`train_gated` trains one model with one seed, :func:`evaluate_gated_checkpoint` scores
its ``best.pt`` on a test store. What a model is (kinds, options, settings, names) lives in
:mod:`smoe.families.gated.spec`.

Training: minibatches (``batch_size``, the paper 512) of images scaled to [0, 1] and
normalised per channel as the official code (:data:`smoe.families.gated.images.NORMALIZATION`;
CIFAR-10 training batches are also flipped and cropped at random, :func:`augment_cifar`),
shuffled by the trainer's seeded generator; Adam (lr 1e-3, the kind's weight decay, no
schedule) on the variant's loss (:func:`smoe.families.gated.models.gated_loss`; a single
model: CE of
its probabilities) plus the options' regularisers computed from the pass's gate weights
(``importance: w`` adds :func:`importance_loss`, ``similarity`` adds
:func:`sample_similarity_loss`). The stochastic variant draws its training routes from the
trainer's ``routes`` stream, CIFAR-10's augmentation from its ``augment`` stream, each a
generator on the training device saved in ``last.pt`` (a resumed run draws what an
uninterrupted one would). Validation on the val store each epoch: ``val_accuracy``
(percent), ``val_loss`` and, for the MoE, the usage and sample entropies (bits). By default
the last epoch's model is kept and tested (``select.mode: last``), and the metrics record the
last epoch's validation accuracy, which the published selection rule reads.

Evaluation predicts as the model does in evaluation mode and routes every sample to the
argmax of its gate weights for the routing matrix and I(E;Y) (Y: that expert's predicted
class); the entropies follow the published conventions
(:func:`smoe.families.gated.metrics.specialisation_metrics`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from smoe.core.config import ModelSpec
from smoe.core.errors import InputError
from smoe.core.report.results import write_json
from smoe.core.train import distributed
from smoe.core.train.checkpoint import load_checkpoint
from smoe.core.train.device import resolve_device
from smoe.core.train.loop import TaskTrainer, TrainingError, TrainingTask
from smoe.families.gated.images import CLASSES, NORMALIZATION
from smoe.families.gated.metrics import (
    accuracy,
    routing_matrix,
    specialisation_metrics,
)
from smoe.families.gated.models import (
    GatedMoE,
    SingleModel,
    architecture_of,
    cross_entropy,
    gated_loss,
    hard_routing,
    importance_loss,
    parameter_count,
    sample_similarity_loss,
    trainable_parameters,
)
from smoe.families.gated.spec import (
    FAMILY,
    GATED_KINDS,
    NOT_IDENTITY,
    TRAIN_DEFAULTS,
    architecture,
    build_gated_model,
    gated_label,
    gated_options,
    rebuild,
    resolve_gated_spec,
    seed_options,
    weight_decay,
)
from smoe.families.gated.store import ImageData, open_image_split

__all__ = [
    "GATED_KINDS",
    "GatedTask",
    "TRAIN_DEFAULTS",
    "augment_cifar",
    "evaluate_gated_checkpoint",
    "gated_label",
    "image_tensor",
    "resolve_gated_spec",
    "run_gated_seeds",
    "seed_options",
    "train_gated",
    "write_json",
]

EVAL_BATCH = 2048
CROP_PADDING = 4
"""CIFAR-10 training crops: 32 x 32 out of the image reflect-padded by 4 on every side."""


# -- data --------------------------------------------------------------------------------


def image_tensor(data: ImageData) -> torch.Tensor:
    """Images as float32 [N, C, H, W]: pixels / 255, then normalised per channel as the
    official code normalises the data set (digits stay in [0, 1])."""
    x = torch.from_numpy(data.image.astype(np.float32) / 255.0)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()
    normalization = NORMALIZATION[data.dataset]
    if normalization is None:
        return x
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in normalization)
    return (x - mean) / std


def augment_cifar(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The official CIFAR-10 training augmentation on a batch [N, C, H, W]: each image
    flipped left-right with probability 1/2, then a random H x W crop of it reflect-padded by
    :data:`CROP_PADDING`; every draw from ``generator`` (on the batch's device)."""
    n, _, height, width = x.shape
    flip = torch.rand(n, generator=generator, device=x.device) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (CROP_PADDING,) * 4, mode="reflect")
    top = torch.randint(0, 2 * CROP_PADDING + 1, (n,), generator=generator, device=x.device)
    left = torch.randint(0, 2 * CROP_PADDING + 1, (n,), generator=generator, device=x.device)
    rows = (top.view(n, 1) + torch.arange(height, device=x.device)).view(n, 1, height, 1)
    cols = (left.view(n, 1) + torch.arange(width, device=x.device)).view(n, 1, 1, width)
    samples = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    channels = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    return padded[samples, channels, rows, cols]


def _open(path: Path, split: str) -> ImageData:
    data = open_image_split(path)
    if data.split != split:
        raise InputError(f"store {str(path)!r} holds the {data.split} split, not {split}")
    return data


# -- the checkpoints a model builds on ---------------------------------------------------


def _trained(path: Any, where: str, role: str, kind: str) -> tuple[dict[str, Any], nn.Module]:
    """The checkpoint and model of a trained model another one builds on (``role``: the
    option naming it, ``kind``: moe or single)."""
    if not isinstance(path, str | Path):
        raise InputError(f"{where}: option {role} must be the path of a trained model's best.pt")
    saved = load_checkpoint(Path(path))
    info = saved.get("data") or {}
    arch = info.get("architecture") or {}
    if info.get("family") != FAMILY or arch.get("type") != kind or "val_metrics" not in saved:
        what = "gated MoE" if kind == "moe" else "gated_single"
        raise InputError(f"{where}: {role} {str(path)!r} is not the best.pt of a trained {what}")
    model = rebuild(arch)
    model.load_state_dict(saved["model"])
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
    layer: the similarity loss's distances in a trained network's features (our
    alternative to the published pixel distances)."""
    features = network.net(x)[1]
    distances = torch.cdist(features, features)
    top = distances.max()
    return distances / top if top > 0 else distances


# -- evaluation-mode outputs -------------------------------------------------------------


@torch.no_grad()
def gated_outputs(model: nn.Module, x: torch.Tensor, batch: int = EVAL_BATCH) -> dict[str, Any]:
    """Evaluation-mode outputs on ``x`` in batches: ``output`` [N, C] (class probabilities)
    and for the MoE ``weights`` [N, E], ``choice`` (their argmax) and ``expert_pred`` (the
    chosen expert's own class)."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    try:
        for start in range(0, x.shape[0], batch):
            out = model(x[start : start + batch])
            if isinstance(out, torch.Tensor):
                parts.setdefault("output", []).append(out.float())
                continue
            rows = torch.arange(out["choice"].shape[0], device=x.device)
            chosen = out["expert_probs"][rows, out["choice"]]
            for key, value in (
                ("output", out["output"].float()),
                ("weights", out["weights"].float()),
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
    keep_freed_memory = True

    def __init__(
        self, spec: ModelSpec | Mapping[str, Any], train_store: str | Path, val_store: str | Path
    ) -> None:
        super().__init__(resolve_gated_spec(spec))
        self.train_store, self.val_store = Path(train_store), Path(val_store)
        self.checkpoint_every = self.settings["checkpoint_every"]
        self.options = gated_options(self.spec.kind, self.spec.options, f"model {self.spec.name!r}")

    def load(self, device: torch.device) -> None:
        train, val = _open(self.train_store, "train"), _open(self.val_store, "val")
        if train.image.shape[1:] != val.image.shape[1:] or train.dataset != val.dataset:
            raise InputError(
                f"stores {str(self.train_store)!r} and {str(self.val_store)!r} hold different "
                f"data sets or image shapes"
            )
        self.train_data, self.val_data = train, val
        self.architecture_name = architecture_of(train.dataset)
        self.augment = train.dataset == "cifar10"
        self.x, self.y = image_tensor(train).to(device), torch.from_numpy(train.label).to(device)
        self.val_x = image_tensor(val).to(device)
        self.val_y = torch.from_numpy(val.label).to(device)
        self.in_shape = tuple(int(n) for n in self.x.shape[1:])
        self.provenance = {"train": train.provenance, "val": val.provenance}
        where = f"model {self.spec.name!r}"
        self.teacher = None
        if self.spec.kind == "gated_distilled":
            saved, self.teacher = _trained(self.options["teacher"], where, "teacher", "moe")
            self.provenance["teacher"] = _weights_record(saved)
            self.teacher_options = (saved.get("spec") or {}).get("options") or {}
        self.features = None
        features = (self.options.get("similarity") or {}).get("features")
        if features is not None:
            saved, network = _trained(features, where, "similarity.features", "single")
            if tuple(network.net.trunk.in_shape) != self.in_shape:
                raise InputError(
                    f"{where}: similarity.features {str(features)!r} was trained on images "
                    f"{tuple(network.net.trunk.in_shape)}, these are {self.in_shape}"
                )
            network.eval()
            for param in network.parameters():
                param.requires_grad_(False)
            self.features = network.to(device)
            self.provenance["features"] = _weights_record(saved)

    def build_model(self) -> nn.Module:
        model = build_gated_model(
            self.spec.kind,
            self.spec.options,
            self.in_shape,
            CLASSES,
            self.architecture_name,
            self.teacher,
        )
        self.architecture = architecture(model)
        return model

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            trainable_parameters(model),
            lr=self.settings["lr"],
            weight_decay=weight_decay(self.spec.kind, self.settings),
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
            "normalization": NORMALIZATION[self.train_data.dataset],
            "augment": self.augment,
            "train_store": str(self.train_store),
            "val_store": str(self.val_store),
            "train_samples": len(self.train_data),
            "val_samples": len(self.val_data),
            "teacher_options": getattr(self, "teacher_options", None),
        }

    def summary_info(self) -> dict[str, Any]:
        return {
            "family": FAMILY,
            "dataset": self.train_data.dataset,
            "train_samples": len(self.train_data),
            "val_samples": len(self.val_data),
        }

    # -- one epoch -----------------------------------------------------------------------
    def _batch(self, trainer: TaskTrainer, index: torch.Tensor) -> torch.Tensor:
        x = self.x[index]
        return augment_cifar(x, trainer.stream("augment")) if self.augment else x

    def _loss(self, out: Any, y: torch.Tensor) -> torch.Tensor:
        """The model's own loss: its variant's for an MoE, CE of the probabilities for a
        single model."""
        return cross_entropy(out, y) if isinstance(out, torch.Tensor) else gated_loss(out, y)

    def _regularisers(self, weights: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The options' regularisers of one batch, from its gate ``weights`` and inputs."""
        extra = {}
        if self.options.get("importance"):
            extra["importance"] = importance_loss(weights, self.options["importance"])
        similarity = self.options.get("similarity")
        if similarity:
            distances = None if self.features is None else feature_distances(self.features, x)
            extra["similarity"] = sample_similarity_loss(
                weights, x, similarity.get("beta_s", 0.0), similarity.get("beta_d", 0.0), distances
            )
        return extra

    def _check_finite(self, total: torch.Tensor, epoch: int, step: int) -> None:
        if not math.isfinite(float(total.detach())):
            raise TrainingError(
                f"model {self.spec.name!r}: the loss became non-finite (NaN or Inf) at "
                f"epoch {epoch}, step {step}; lower train.lr or check the data"
            )

    def train_epoch(self, trainer: TaskTrainer, epoch: int) -> dict[str, float]:
        if trainer.world.multi:
            return self._train_epoch_shared(trainer, epoch)
        model, optimizer = trainer.model, trainer.optimizer
        model.train()
        if isinstance(model, GatedMoE):
            model.generator = trainer.stream("routes")
        n = self.x.shape[0]
        order = torch.randperm(n, generator=trainer.generator).to(self.x.device)
        totals: dict[str, float] = {"loss": 0.0}
        correct, steps = 0, 0
        for start in range(0, n, self.settings["batch_size"]):
            index = order[start : start + self.settings["batch_size"]]
            x, y = self._batch(trainer, index), self.y[index]
            out = model(x)
            loss = self._loss(out, y)
            extra = {} if isinstance(out, torch.Tensor) else self._regularisers(out["weights"], x)
            total = loss + sum(extra.values()) if extra else loss
            self._check_finite(total, epoch, steps)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            totals["loss"] += float(loss.detach())
            for key, value in extra.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach())
            output = out if isinstance(out, torch.Tensor) else out["output"]
            correct += int((output.detach().argmax(dim=-1) == y).sum())
            steps += 1
        row = {"train_loss": totals.pop("loss") / steps, "train_accuracy": 100.0 * correct / n}
        row.update({f"train_{key}": value / steps for key, value in totals.items()})
        return row

    def _train_epoch_shared(self, trainer: TaskTrainer, epoch: int) -> dict[str, float]:
        """One epoch on this process's share of every global minibatch (under torchrun),
        with the results of :meth:`train_epoch` in one process (to float rounding).

        Every process draws the same batch order; the mean losses are weighted by the share
        (DDP averages the gradients); what is computed over the whole batch sees the whole
        batch: the regularisers get every process's gate weights (the others' as constants,
        this share's with its gradient, so the summed gradient is the whole batch's), and
        the stochastic variant's routes are drawn on the whole batch's weights from the
        ``routes`` stream, as one process draws them.
        """
        model, optimizer, world = trainer.model, trainer.optimizer, trainer.world
        net = trainer.train_model
        model.train()
        moe = isinstance(model, GatedMoE)
        stochastic = moe and model.variant == "stochastic"
        if moe:  # the model's own draws are redone below on the whole batch
            model.generator = torch.Generator(device=self.x.device).manual_seed(0)
        gather = moe and bool(
            self.options.get("importance") or self.options.get("similarity") or stochastic
        )
        n, batch_size = self.x.shape[0], self.settings["batch_size"]
        distributed.check_batches(n, batch_size, world, f"model {self.spec.name!r}")
        order = torch.randperm(n, generator=trainer.generator).to(self.x.device)
        sums = torch.zeros(2, dtype=torch.float64)  # share-weighted loss, correct
        totals: dict[str, float] = {}
        steps = 0
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            x_all = self._batch(trainer, index)
            low, high = distributed.share(len(index), world)
            x, y = x_all[low:high], self.y[index[low:high]]
            share = (high - low) / len(index)
            out = net(x)
            weights = None
            if gather:
                sizes = distributed.share_sizes(len(index), world.size)
                w_all = distributed.gather_rows(out["weights"].detach(), sizes)
                weights = torch.cat([w_all[:low], out["weights"], w_all[high:]])
            output = out if isinstance(out, torch.Tensor) else out["output"]
            if stochastic:
                routes = trainer.stream("routes")
                choice = torch.multinomial(w_all, 1, generator=routes).squeeze(1)
                rows = torch.arange(high - low, device=x.device)
                output = out["expert_probs"][rows, choice[low:high]]
            loss = self._loss(out, y)  # this share's; the regularisers see the whole batch
            extra = self._regularisers(weights, x_all) if gather else {}
            total = loss * (share * world.size)
            for value in extra.values():
                total = total + value * world.size
            self._check_finite(total, epoch, steps)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            sums[0] += float(loss.detach()) * share
            sums[1] += int((output.detach().argmax(dim=-1) == y).sum())
            for key, value in extra.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach())
            steps += 1
        sums = distributed.all_reduce_sum(sums.to(self.x.device)).cpu()
        row = {"train_loss": float(sums[0]) / steps, "train_accuracy": 100.0 * float(sums[1]) / n}
        row.update({f"train_{key}": value / steps for key, value in totals.items()})
        return row

    def validate(self, trainer: TaskTrainer) -> dict[str, float]:
        model = trainer.model
        out = gated_outputs(model, self.val_x)
        metrics = {
            "val_accuracy": accuracy(out["output"], self.val_y),
            "val_loss": float(cross_entropy(out["output"], self.val_y)),
        }
        if "weights" in out:
            scores = specialisation_metrics(
                out["weights"].cpu().numpy(),
                out["choice"].cpu().numpy(),
                out["expert_pred"].cpu().numpy(),
                self.val_y.cpu().numpy(),
                model.n_experts,
                CLASSES,
                model.hard,
            )
            metrics["val_usage_entropy"] = scores["usage_entropy"]
            metrics["val_sample_entropy"] = scores["sample_entropy"]
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


def _stored_shape(in_shape: list[int]) -> list[int]:
    """The store's image shape of a model input (C, H, W): (H, W) grey, (H, W, C) colour."""
    channels, height, width = in_shape
    return [height, width] if channels == 1 else [height, width, channels]


def _last_val_accuracy(saved: Mapping[str, Any]) -> float | None:
    """The last epoch's validation accuracy (the published selection rule's figure)."""
    row = saved.get("last_row") or {}
    value = row.get("val_accuracy")
    return None if value is None else float(value)


def evaluate_gated_checkpoint(checkpoint: str | Path, test_store: str | Path) -> dict[str, Any]:
    """Scores of a gated model's ``best.pt`` on a test store (one float32 pass in evaluation
    mode): test accuracy (percent) and, for MoEs, the specialisation metrics in bits and the
    routing matrix (counts [experts, classes]), every sample routed to the argmax of its
    gate weights; and the last epoch's validation accuracy, which the published selection
    rule reads. The test store must hold the data set and image shape the model was
    trained on."""
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
        "test_accuracy": accuracy(out["output"], labels),
        "mutual_information": None,
        "sample_entropy": None,
        "usage_entropy": None,
        "per_task_entropy": None,
    }
    routing, variant, experts, top_k, attentive = None, None, None, None, None
    if isinstance(model, GatedMoE):
        experts, variant = model.n_experts, model.variant
        top_k, attentive = model.top_k, model.attentive
        metrics.update(
            specialisation_metrics(
                out["weights"],
                out["choice"],
                out["expert_pred"],
                labels,
                experts,
                classes,
                model.hard,
            )
        )
        counts = routing_matrix(out["choice"], labels, experts, classes)
        routing = {"matrix": counts.tolist(), "experts": experts, "classes": classes}
    kept = spec.train["select"]["mode"]
    return {
        "family": FAMILY,
        "dataset": info["dataset"],
        "model": spec.name,
        "kind": spec.kind,
        "label": gated_label(spec.kind, spec.options, info.get("teacher_options")),
        "options": spec.options,
        "variant": variant,
        "top_k": top_k,
        "attentive": attentive,
        "experts": experts,
        "architecture": info["architecture"]["args"]["architecture"],
        "hard_routing": None if variant is None else hard_routing(variant, top_k),
        "seed": int(saved["seed"]),
        "params": parameter_count(model),
        "best_epoch": int(saved["epoch"]),
        "epochs": int(saved["epochs"]),
        "kept": "last epoch" if kept == "last" else f"best {spec.train['select']['metric']}",
        "val_accuracy": float(saved["val_metrics"]["val_accuracy"]),
        "last_val_accuracy": _last_val_accuracy(saved),
        "train_time_s": float(saved["train_time_s"]),
        "device": str(device),
        "routing_rule": "argmax",
        "metrics": metrics,
        "routing": routing,
        "store": str(test_store),
        "train_store": info["train_store"],
        "val_store": info["val_store"],
    }


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

    A training of this family takes seconds, about what starting Python and PyTorch takes,
    so the workflow runs one job per model rather than per seed; each seed keeps its own
    folder, checkpoints and resume, exactly as if it had been trained alone.
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
