"""The heat family's part of training: :class:`HeatTask` for the shared
:class:`smoe.core.train.loop.TaskTrainer`, and its entry points :class:`Trainer` and
:func:`train`.

For SMoE models each validation pass also counts which expert the final layer chose at each
point (:class:`smoe.families.heat.evaluate.RoutingTally`); the validation metrics gain the
routing agreement with the true region map, ``routing_agreement`` and ``map_agreement``
(percent), so the history has them per epoch (``val_routing_agreement``,
``val_map_agreement``) and ``train.json`` for the best epoch. The count only reads the
routing: nothing learned or selected depends on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from smoe.core.config import ModelSpec
from smoe.core.errors import InputError
from smoe.core.train import distributed
from smoe.core.train.loop import TaskTrainer, TrainingError, TrainingTask
from smoe.families.heat.dataset import HeatPairs, Normalizer, loader
from smoe.families.heat.evaluate import RoutingTally, dataset_metrics
from smoe.families.heat.registry import build_model
from smoe.nn.layer import auxiliary_loss, set_loss_scale, smoe_layers


def make_datasets(spec: ModelSpec, train_store: Path, val_store: Path) -> tuple[HeatPairs, ...]:
    """Train and validation pairs, both scaled with the train split's statistics."""
    data = spec.data
    normalizer = Normalizer.fit(train_store, data["normalization"])
    options = dict(
        context=data["context"],
        mask_channel=data["mask_channel"],
        normalizer=normalizer,
        eager=data["eager"],
    )
    train_set = HeatPairs(train_store, **options)
    val_set = HeatPairs(val_store, **options)
    if (val_set.height, val_set.width) != (train_set.height, train_set.width) or not torch.equal(
        val_set.mask, train_set.mask
    ):
        raise InputError(
            f"store {str(val_store)!r} has a different grid or region map than "
            f"{str(train_store)!r}; both splits must come from the same mask"
        )
    return train_set, val_set


def check_in_channels(model: nn.Module, dataset: HeatPairs, name: str) -> None:
    """Fail early, with both numbers, when a model was built for other input channels."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    expected = getattr(first, "in_channels", None)
    if first is not None and expected not in (dataset.in_channels, dataset.in_channels + 2):
        raise InputError(
            f"model {name!r} expects {expected} input channels but {str(dataset.store_path)!r} "
            f"gives {dataset.in_channels} (1 frame + {dataset.context} context"
            f"{' + mask' if dataset.in_channels > 1 + dataset.context else ''})"
        )


class HeatTask(TrainingTask):
    """The heat family: next-frame prediction on heat-equation stores, minibatches of MSE
    (plus the SMoE layers' auxiliary losses), validated with :func:`dataset_metrics`.

    Driven by :class:`Trainer`, which passes its routing tally to :meth:`validate`.

    Under several processes (``torchrun``) each trains on its share of every minibatch
    (:mod:`smoe.core.train.distributed`): the mean loss is weighted by the share and the SMoE
    layers are told that weight as their loss scale, so the routing decisions (RC labels,
    damping) and the averaged gradient are those of one process on the whole batch. Batch
    norms normalise over the whole batch. Refused there: the auxiliary losses over the whole
    batch (``importance``, ``load``, ``load_shazeer``, ``spatial``) and routing ``noise``
    (drawn per sample from torch's generator).
    """

    multi_process = True
    BATCH_WIDE_AUX = ("importance", "load", "load_shazeer", "spatial")

    def __init__(self, spec: ModelSpec, train_store: Path, val_store: Path) -> None:
        super().__init__(spec)
        self.train_store = Path(train_store)
        self.val_store = Path(val_store)
        self.smoe_layers: list = []

    def load(self, device: torch.device) -> None:
        self.train_set, self.val_set = make_datasets(self.spec, self.train_store, self.val_store)

    def build_model(self) -> nn.Module:
        spec, train_set = self.spec, self.train_set
        model = build_model(
            spec.kind,
            spec.options,
            train_set.in_channels,
            train_set.height,
            train_set.width,
            mask=train_set.mask,
            name=spec.name,
            region_diffusivity=train_set.diffusivity,
            boundary=train_set.boundary,
        )
        check_in_channels(model, train_set, spec.name)
        self.smoe_layers = smoe_layers(model)
        return model

    def data_provenance(self) -> dict[str, Any]:
        return {"train": self.train_set.provenance, "val": self.val_set.provenance}

    def check_processes(self, model: nn.Module, processes: int) -> None:
        where = f"model {self.spec.name!r}"
        advice = "train it on one process (train.processes: 1)"
        for layer in self.smoe_layers:
            batch_wide = [name for name in self.BATCH_WIDE_AUX if name in layer.aux]
            if batch_wide:
                raise InputError(
                    f"{where}: option aux {batch_wide} is computed over the whole minibatch, "
                    f"which {processes} processes do not share; {advice} or drop it"
                )
            if layer.routing.noise:
                raise InputError(
                    f"{where}: option noise draws routing noise sample by sample, which "
                    f"{processes} processes would not draw as one does; {advice}"
                )
        distributed.check_batches(
            len(self.train_set),
            self.settings["batch_size"],
            distributed.World(0, processes),
            where,
        )

    def data_info(self) -> dict[str, Any]:
        return {
            "normalizer": self.train_set.normalizer.to_dict(),
            "in_channels": self.train_set.in_channels,
            "height": self.train_set.height,
            "width": self.train_set.width,
            "mask": self.train_set.mask.clone(),
            "diffusivity": list(self.train_set.diffusivity),
            "boundary": self.train_set.boundary,
            "train_store": str(self.train_set.store_path),
        }

    def train_epoch(self, trainer: TaskTrainer, epoch: int) -> dict[str, float]:
        model, optimizer, scaler, device = (
            trainer.train_model,
            trainer.optimizer,
            trainer.scaler,
            trainer.device,
        )
        world = trainer.world
        batch_size, n = self.settings["batch_size"], len(self.train_set)
        model.train()
        totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, aux, rc, mis
        # the first step whose loss was NaN/Inf (the data were checked when loaded: see
        # HeatPairs, which refuses a non-finite value before a model sees it)
        first_bad = torch.full((), -1, dtype=torch.long, device=device)
        steps = 0
        batches = loader(
            self.train_set,
            self.settings["batch_size"],
            shuffle=True,
            generator=trainer.generator,
            workers=self.spec.data["workers"],
            part=(world.rank, world.size) if world.multi else None,
        )
        for step, (x, y) in enumerate(batches):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if world.multi:  # this share's part of the global batch's mean loss
                share = x.shape[0] / min(batch_size, n - step * batch_size)
                weight = share * world.size
                self._set_route_scale(trainer, weight)  # read by the forward pass
            with trainer.autocast():
                pred = model(x)
            loss = F.mse_loss(pred.float(), y)
            aux = auxiliary_loss(trainer.model)
            total = loss if aux is None else loss + aux
            if world.multi:
                total = total * weight
            first_bad = torch.where(~torch.isfinite(total) & (first_bad < 0), step, first_bad)
            if step % 64 == 0 or device.type == "cpu":
                self._raise_if_bad(first_bad, epoch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
            stats = [layer.stats for layer in self.smoe_layers]
            row = torch.stack(
                [
                    loss.detach().double(),
                    aux.detach().double() if aux is not None else totals.new_zeros(()),
                    sum(
                        (s.get("routing_classification", 0.0) for s in stats), totals.new_zeros(())
                    ),
                    sum((s.get("misrouted_fraction", 0.0) for s in stats), totals.new_zeros(())),
                ]
            )
            totals += row * share if world.multi else row
            steps += 1
        self._raise_if_bad(first_bad, epoch)
        if world.multi:
            set_loss_scale(trainer.model, trainer.scaler)
            totals = distributed.all_reduce_sum(totals)
        if steps == 0:
            raise InputError(f"store {str(self.train_set.store_path)!r} gave no training batch")
        means = (totals / steps).tolist()
        return {
            "train_loss": means[0],
            "train_aux": means[1],
            "train_rc": means[2],
            "train_misrouted": means[3],
        }

    def _set_route_scale(self, trainer: TaskTrainer, weight: float) -> None:
        """Tell the SMoE layers the factor on this process's loss (times the scaler's), so
        their routing signals stay those of the global batch's mean loss."""
        if not self.smoe_layers:
            return
        scale: float | torch.Tensor = weight
        if trainer.scaler.is_enabled():
            scale = trainer.scaler.scale(torch.ones((), device=trainer.device)) * weight
        for layer in self.smoe_layers:
            layer.loss_scale = scale

    def _raise_if_bad(self, first_bad: torch.Tensor, epoch: int) -> None:
        loss_step = int(first_bad)
        if loss_step >= 0:
            raise TrainingError(
                f"model {self.spec.name!r}: the loss became non-finite (NaN or Inf) at epoch "
                f"{epoch}, step {loss_step}; lower train.lr or check the data"
            )

    def routing_tally(self) -> RoutingTally | None:
        """A fresh count of the final SMoE layer's choices (None without SMoE layers)."""
        if not self.smoe_layers:
            return None
        return RoutingTally(self.smoe_layers[-1], self.val_set.mask)

    def validate(self, trainer: TaskTrainer, tally: RoutingTally | None = None) -> dict[str, float]:
        """Validation metrics; with a ``tally`` also the routing agreement (percent) with
        the true region map, counted during the same pass (read-only: no random numbers
        drawn, no state of the model changed, so training goes on exactly as without)."""
        evaluate = self.spec.evaluate
        metrics = dataset_metrics(
            trainer.model,
            self.val_set,
            trainer.device,
            evaluate["rtols"],
            evaluate["region_rtol_scale"],
            evaluate["batch_size"],
            tally,
        )
        if tally is not None:
            routing = tally.summary()
            metrics["routing_agreement"] = routing["agreement"]
            metrics["map_agreement"] = routing["map_agreement"]
        return metrics


class Trainer(TaskTrainer):
    """Trains one heat-family model with one seed into ``out_dir``: :class:`TaskTrainer`
    driving a :class:`HeatTask`; see the module docstring."""

    def __init__(
        self,
        spec: ModelSpec,
        train_store: str | Path,
        val_store: str | Path,
        seed: int,
        out_dir: str | Path,
        progress: bool = True,
    ) -> None:
        super().__init__(
            HeatTask(spec, Path(train_store), Path(val_store)), seed, out_dir, progress
        )

    @property
    def train_set(self) -> HeatPairs:
        return self.task.train_set

    @property
    def val_set(self) -> HeatPairs:
        return self.task.val_set

    @property
    def smoe_layers(self) -> list:
        return self.task.smoe_layers

    def _routing_tally(self) -> RoutingTally | None:
        """A fresh count of the final SMoE layer's choices (None without SMoE layers)."""
        return self.task.routing_tally()

    def _validate(self) -> dict[str, float]:
        """Validation metrics; for SMoE models also the routing agreement with the true
        region map (see :meth:`HeatTask.validate`)."""
        return self.task.validate(self, self._routing_tally())


def train(
    spec: ModelSpec,
    train_store: str | Path,
    val_store: str | Path,
    seed: int,
    out_dir: str | Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one heat-family model with one seed; see :class:`Trainer`."""
    return Trainer(spec, train_store, val_store, seed, out_dir, progress).run()
