"""Evaluation: metrics of a model on a split, and for SMoE what its routing learned.

Evaluation always loads ``best.pt`` (the best validation epoch), so test figures never come
from whatever the last epoch happened to be. For SMoE models it also reports how well the
final layer's routing matches the true region map (after the best one-to-one matching of
experts to region types) and how close each matched expert's kernel is to the true stencil.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from smoe.core.atomic import atomic_file
from smoe.core.config import ModelSpec
from smoe.core.errors import InputError
from smoe.core.train.checkpoint import load_checkpoint
from smoe.core.train.device import resolve_device
from smoe.families.heat.dataset import HeatPairs, Normalizer, loader
from smoe.families.heat.metrics import MetricAccumulator
from smoe.families.heat.reference import reference_stencil
from smoe.families.heat.registry import build_model
from smoe.nn.layer import SMoELayer, smoe_layers


class RoutingTally:
    """Counts, over every evaluated point, which expert the final SMoE layer chose.

    The counts stay on the device the layer runs on (no host sync per batch) and are
    integers, so they do not depend on the device or on the batching.
    """

    def __init__(self, layer: SMoELayer, mask: torch.Tensor) -> None:
        self.layer = layer
        self.mask = mask.long().cpu()
        self.experts = layer.routing.experts
        self.types = int(self.mask.max()) + 1
        height, width = self.mask.shape
        self.per_point = torch.zeros(self.experts, height, width, dtype=torch.long)

    def update(self) -> None:
        """Count the top-1 expert of every point of the layer's last forward pass."""
        chosen = self.layer.last_selection[:, 0]  # top-1 expert, [B, H, W]
        if chosen.shape[1:] != self.per_point.shape[1:]:
            raise ValueError(
                f"routing of grid {tuple(chosen.shape[1:])} does not match the region map "
                f"{tuple(self.per_point.shape[1:])}"
            )
        if self.per_point.device != chosen.device:
            self.per_point = self.per_point.to(chosen.device)
        flat = chosen.reshape(chosen.shape[0], -1)  # [B, H*W]
        ones = torch.ones((), dtype=torch.long, device=flat.device).expand_as(flat)
        # per_point[chosen[b, p], p] += 1 for every b: one pass, no [B, H, W, E] one-hot;
        # scatter_add_ is deterministic on CUDA too (torch.use_deterministic_algorithms).
        self.per_point.view(self.experts, -1).scatter_add_(0, flat, ones)

    def summary(self) -> dict[str, Any]:
        from scipy.optimize import linear_sum_assignment

        per_point = self.per_point.cpu()
        regions = torch.nn.functional.one_hot(self.mask, self.types).permute(2, 0, 1)
        confusion = torch.einsum("ehw,thw->et", per_point, regions).numpy()  # [E, T]
        experts, types = linear_sum_assignment(confusion, maximize=True)
        matching = {int(e): int(t) for e, t in zip(experts, types, strict=True)}
        total = confusion.sum()
        majority = per_point.argmax(dim=0)
        as_types = torch.tensor([matching.get(e, -1) for e in range(self.experts)])[majority]
        return {
            "agreement": 100.0 * float(confusion[experts, types].sum()) / float(total),
            "map_agreement": 100.0 * float((as_types == self.mask).float().mean()),
            "expert_to_type": matching,
            "confusion": confusion.tolist(),
            "map": majority.tolist(),
        }


def kernel_report(layer: SMoELayer, matching: dict[int, int], diffusivity) -> dict[str, Any]:
    """Each matched expert's kernel on the current frame against its type's true stencil."""
    kernels = layer.expert_kernels()[:, 0, 0].double().cpu()  # [E, k, k]
    if kernels.shape[-1] != 3:
        return {}
    errors = {}
    for expert, region in matching.items():
        stencil = torch.from_numpy(reference_stencil(float(diffusivity[region])))
        errors[expert] = float((kernels[expert] - stencil).abs().max())
    return {
        "kernels": kernels.tolist(),
        "stencils": [reference_stencil(float(a)).tolist() for a in diffusivity],
        "kernel_max_abs_error": max(errors.values()) if errors else None,
        "kernel_error_per_expert": {str(e): v for e, v in errors.items()},
    }


EVALUATION_CHUNK = 32
"""Evaluation runs and accumulates the metrics in chunks of this many samples, at offsets of
the split that are multiples of it, whatever ``evaluate.batch_size`` says: a metric is then
bit for bit the same for every batch size (a batch only says how many samples are loaded at
once). A convolution's rounding for a sample can change with the size of the batch it is
computed in (oneDNN picks its kernel by batch size, and that choice differs between CPUs),
and a float64 sum of per-batch sums depends on where the batches break. On the CPU this is
also the faster size: oneDNN's convolution costs several times more per sample on larger
batches on these machines (the paper's expert layer: 0.55 ms for 32 samples, 20 ms for 256).
On a GPU the model runs on the whole loaded batch (a chunk of 32 would idle it), and only
the sums are taken per chunk."""


def evaluation_batch_size(batch_size: int) -> int:
    """``batch_size`` rounded up to a whole number of :data:`EVALUATION_CHUNK` chunks, so that
    every loaded batch starts at a chunk boundary of the split."""
    return -(-batch_size // EVALUATION_CHUNK) * EVALUATION_CHUNK


def _chunk_predictions(model: nn.Module, x: torch.Tensor, tally: RoutingTally | None):
    """The model's outputs for one loaded batch, one tensor per chunk of
    :data:`EVALUATION_CHUNK` samples; the routing tally counts every forward pass."""
    if x.device.type == "cpu":
        forwards = []
        for chunk in x.split(EVALUATION_CHUNK):
            forwards.append(model(chunk))
            if tally is not None:
                tally.update()  # reads the routing of the forward pass just run
        return forwards
    out = model(x)
    if tally is not None:
        tally.update()
    return list(out.split(EVALUATION_CHUNK))


@torch.no_grad()
def dataset_metrics(
    model: nn.Module,
    dataset: HeatPairs,
    device: torch.device,
    rtols,
    region_rtol_scale,
    batch_size: int,
    tally: RoutingTally | None = None,
    predictions: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Every metric of ``model`` on ``dataset``, in physical units (denormalised), computed
    in float32 whatever precision the model trained in: a metric must not depend on how it
    was computed, and a time step of this data is finer than half precision resolves.

    ``predictions``, when given, receives each chunk's denormalised predictions (on the CPU,
    in dataset order) so that evaluation and the prediction export share one pass. Runs in
    chunks of :data:`EVALUATION_CHUNK` samples, so ``batch_size`` changes no metric.
    """
    accumulator = MetricAccumulator(dataset.mask, rtols, region_rtol_scale)
    normalizer = dataset.normalizer
    was_training = model.training
    model.eval()
    batches = loader(dataset, evaluation_batch_size(batch_size), shuffle=False, generator=None)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        chunks = _chunk_predictions(model, x, tally)
        for out, target in zip(chunks, y.split(EVALUATION_CHUNK), strict=True):
            pred = normalizer.denormalize(out.float())
            accumulator.update(pred, normalizer.denormalize(target))
            if predictions is not None:
                predictions.append(pred.cpu())
    model.train(was_training)
    return accumulator.compute()


def evaluate_checkpoint(
    checkpoint: str | Path,
    store: str | Path,
    device: str = "auto",
    routing_map: str | Path | None = None,
    predictions_out: str | Path | None = None,
) -> dict[str, Any]:
    """Test metrics of a ``best.pt`` on a store, plus routing and kernels for SMoE models."""
    saved = load_checkpoint(Path(checkpoint))
    if "val_metrics" not in saved:
        raise InputError(f"{checkpoint}: not a best-model checkpoint (use best.pt)")
    spec = ModelSpec.from_dict(saved["spec"])
    info = saved["data"]
    torch_device = resolve_device(device)
    dataset = HeatPairs(
        store,
        context=spec.data["context"],
        mask_channel=spec.data["mask_channel"],
        normalizer=Normalizer.from_dict(info["normalizer"]),
        eager=spec.data["eager"],
    )
    if (dataset.height, dataset.width) != (info["height"], info["width"]) or not torch.equal(
        dataset.mask, info["mask"]
    ):
        raise InputError(
            f"store {str(store)!r} has a different grid or region map than the model was "
            f"trained on ({info['train_store']})"
        )
    for field, trained, tested in (
        ("diffusivity", list(info["diffusivity"]), list(dataset.diffusivity)),
        ("boundary", info.get("boundary", "zero"), dataset.boundary),
    ):
        if trained != tested:
            raise InputError(
                f"store {str(store)!r} has {field} {tested} but the model was trained on "
                f"{field} {trained} ({info['train_store']}): test data from other physics "
                f"would be scored against the wrong stencils"
            )
    model = build_model(
        spec.kind,
        spec.options,
        info["in_channels"],
        info["height"],
        info["width"],
        mask=info["mask"],
        name=spec.name,
        region_diffusivity=tuple(info["diffusivity"]),
        boundary=info.get("boundary", "zero"),
    )
    model.load_state_dict(saved["model"])
    model.to(torch_device)
    layers = smoe_layers(model)
    tally = RoutingTally(layers[-1], dataset.mask) if layers else None
    evaluate = spec.evaluate
    predictions: list[torch.Tensor] | None = [] if predictions_out is not None else None
    metrics = dataset_metrics(
        model,
        dataset,
        torch_device,
        evaluate["rtols"],
        evaluate["region_rtol_scale"],
        evaluate["batch_size"],
        tally,
        predictions,
    )
    result: dict[str, Any] = {
        "model": spec.name,
        "kind": spec.kind,
        "seed": saved["seed"],
        "checkpoint": str(checkpoint),
        "store": str(store),
        "device": str(torch_device),
        "precision": "fp32",
        "best_epoch": saved["epoch"],
        "params": saved["params"],
        "train_time_s": saved["train_time_s"],
        "metrics": metrics,
        "routing": None,
    }
    if tally is not None:
        routing = tally.summary()
        routing.update(kernel_report(layers[-1], routing["expert_to_type"], dataset.diffusivity))
        routing["expert_to_type"] = {str(k): v for k, v in routing["expert_to_type"].items()}
        result["routing"] = routing
        if routing_map is not None:
            with atomic_file(Path(routing_map)) as partial, open(partial, "wb") as handle:
                np.save(handle, np.asarray(routing["map"], dtype=np.int64))
    if predictions_out is not None:
        from smoe.families.heat.predictions import write_predictions

        write_predictions(torch.cat(predictions), dataset, result, predictions_out)
    return result
