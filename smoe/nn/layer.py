"""The Spatial Mixture-of-Experts layer and networks built from it.

Experts are one convolution with E (x F) output channels, evaluated everywhere; a gate scores
each expert at each point and top-K routing keeps K of them per point (see
:mod:`smoe.nn.routing` for the backward pass that trains experts and gate). Auxiliary
gate losses are exposed per layer in ``aux_losses`` (already multiplied by their
coefficients) and summed by the trainer, as MoE libraries do.

Training with a loss scale (fp16 with ``torch.amp.GradScaler``) must tell the layers the
scale, :func:`set_loss_scale`, so that the routing signals stay those of the true gradient.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from torch import nn

from smoe.core.errors import InputError
from smoe.nn.gates import build_gate
from smoe.nn.layers import make_activation
from smoe.nn.routing import Routing, RoutingOptions, route

AUX_LOSSES = ("importance", "load", "spatial", "load_shazeer", "smoothness")
"""``importance``, ``load`` and ``spatial`` (agreement across the batch) are the paper's
reference formulas; ``load_shazeer`` (Shazeer et al. 2017's load, the threshold taken among
the other experts) and ``smoothness`` (squared differences between neighbouring points)
are ours."""


def coefficient_of_variation_squared(values: torch.Tensor) -> torch.Tensor:
    """CV^2 = (std / mean)^2 over all entries (unbiased std, as the reference code): zero
    when every expert gets the same share."""
    return (values.std() / values.mean()) ** 2


EXPERT_INITS = ("reference", "pytorch", "identity")


@torch.no_grad()
def init_experts(weight: torch.Tensor, how: str, final: bool = True) -> None:
    """How the expert filters start.

    ``reference`` is the paper's code: Kaiming-uniform with the gain of the activation that
    follows (1 for the final layer, whose output is the prediction: bound sqrt(3 / fan_in),
    0.577 for one 3x3 input channel; sqrt(2) for hidden layers followed by a ReLU).
    ``pytorch`` keeps ``nn.Conv2d``'s own init (bound 1 / sqrt(fan_in), 1/3 there).
    ``identity`` starts every filter near the identity (the persistence predictor) with small
    random deviations, the natural start for an operator that advances a field by one step.
    """
    if how not in EXPERT_INITS:
        raise InputError(f"expert_init {how!r} is not one of {EXPERT_INITS}")
    if how == "reference":
        nn.init.kaiming_uniform_(weight, nonlinearity="linear" if final else "relu")
    elif how == "identity":
        out_channels, in_channels, height, width = weight.shape
        weight.uniform_(-0.01, 0.01)
        weight[:, 0, height // 2, width // 2] += 1.0


LossScale = float | torch.Tensor | torch.amp.GradScaler | None


def set_loss_scale(model: nn.Module, scale: LossScale) -> None:
    """Tell every SMoE layer in ``model`` by how much the loss is multiplied before backward.

    Pass the ``torch.amp.GradScaler`` itself (its current scale is read at every forward,
    without a device synchronisation), a constant, or None for no scaling. Without this, the
    damping and RC thresholds would see a gradient S times too large and the RC gradient
    would reach the gate S times too small after unscaling.
    """
    for layer in smoe_layers(model):
        layer.loss_scale = scale


class SMoELayer(nn.Module):
    """One SMoE layer: [B, C, H, W] -> [B, K*F, H, W] (concat) or [B, F, H, W] (sum over K)."""

    def __init__(
        self,
        in_channels: int,
        height: int,
        width: int,
        routing: RoutingOptions,
        filters: int = 1,
        kernel_size: int = 3,
        gate: str = "latent",
        gate_options: dict[str, Any] | None = None,
        mask_input: bool = False,
        orthogonal: bool = False,
        mask: torch.Tensor | None = None,
        combine: str = "concat",
        aux: dict[str, float] | None = None,
        expert_init: str = "reference",
        final: bool = True,
    ) -> None:
        super().__init__()
        self.routing = routing.validate()
        self.filters = filters
        if combine not in ("concat", "sum"):
            raise InputError(f"combine must be 'concat' or 'sum', got {combine!r}")
        self.combine = combine
        self.aux = {name: float(c) for name, c in (aux or {}).items() if c}
        unknown = set(self.aux) - set(AUX_LOSSES)
        if unknown:
            raise InputError(f"unknown auxiliary losses {sorted(unknown)}; known: {AUX_LOSSES}")
        loads = {"load", "load_shazeer"} & set(self.aux)
        if loads and not (routing.noise and routing.experts > routing.k):
            raise InputError(
                f"the {sorted(loads)[0]} loss needs noise: true and more experts than k"
            )
        self.experts = nn.Conv2d(
            in_channels,
            routing.experts * filters,
            kernel_size,
            padding=kernel_size // 2,
            bias=False,
        )
        init_experts(self.experts.weight, expert_init, final)
        self.gate = build_gate(
            gate,
            in_channels,
            routing.experts,
            routing.k,
            height,
            width,
            mask_input=mask_input,
            orthogonal=orthogonal,
            mask=mask,
            **(gate_options or {}),
        )
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.stats: dict[str, torch.Tensor] = {}
        self.last_selection: torch.Tensor | None = None
        self.loss_scale: LossScale = None

    @property
    def out_channels(self) -> int:
        per_selection = self.filters
        return per_selection if self.combine == "sum" else per_selection * self.routing.k

    def forward(self, x: torch.Tensor, mask_channel: torch.Tensor | None = None) -> torch.Tensor:
        batch, _, height, width = x.shape
        expert_out = self.experts(x).view(batch, self.routing.experts, self.filters, height, width)
        logits = self.gate(x, mask_channel)
        self.stats = {}
        routing = route(
            expert_out, logits, self.routing, self.training, self.stats, self._scale_tensor(x)
        )
        self.last_selection = routing.idx.detach()
        self.aux_losses = self._aux_losses(routing) if self.aux and self.training else {}
        if self.combine == "sum":  # one selection: a view, no pass over the output either way
            out = routing.out
            return out.squeeze(1) if out.shape[1] == 1 else out.sum(dim=1)
        return routing.out.flatten(1, 2)

    def _scale_tensor(self, x: torch.Tensor) -> torch.Tensor | None:
        scale = self.loss_scale
        if scale is None:
            return None
        if isinstance(scale, torch.amp.GradScaler):
            if not scale.is_enabled():
                return None
            return scale.scale(torch.ones((), device=x.device))
        return torch.as_tensor(scale, dtype=torch.float32, device=x.device)

    def _aux_losses(self, routing: Routing) -> dict[str, torch.Tensor]:
        """The gate's auxiliary losses on this batch, each times its coefficient."""
        weights = routing.activated
        if self.routing.softmax:
            weights = torch.softmax(weights, dim=1)
        losses = {}
        if "importance" in self.aux:  # every expert's summed routing weight, equal
            losses["importance"] = coefficient_of_variation_squared(weights.sum(dim=(0, 2, 3)))
        if "spatial" in self.aux:  # each point routed alike in every sample of the batch
            losses["spatial"] = routing.activated.std(dim=0).mean(dim=(1, 2)).sum()
        if "load" in self.aux:
            losses["load"] = coefficient_of_variation_squared(
                self._selection_probability(routing, exclude_self=False).sum(dim=0)
            )
        if "load_shazeer" in self.aux:
            losses["load_shazeer"] = coefficient_of_variation_squared(
                self._selection_probability(routing, exclude_self=True).sum(dim=(0, 2, 3))
            )
        if "smoothness" in self.aux:
            probs = torch.softmax(routing.activated, dim=1)
            vertical = (probs[:, :, 1:, :] - probs[:, :, :-1, :]).pow(2).sum(1).mean()
            horizontal = (probs[:, :, :, 1:] - probs[:, :, :, :-1]).pow(2).sum(1).mean()
            losses["smoothness"] = (vertical + horizontal) / 2
        return {name: self.aux[name] * loss for name, loss in losses.items()}

    def _selection_probability(self, routing: Routing, exclude_self: bool) -> torch.Tensor:
        """P(expert e is among the top K if its noise were drawn again), [B, E, H, W].

        With ``exclude_self=False`` (the reference code) the threshold is the K-th largest
        noisy score including e's own; with ``True`` (Shazeer et al. 2017) it is the K-th
        largest among the other experts.
        """
        k = self.routing.k
        clean, noisy = routing.activated, routing.noisy
        normal = torch.distributions.Normal(0.0, 1.0 / self.routing.experts)
        if not exclude_self:
            threshold = torch.topk(noisy, k, dim=1).values[:, k - 1 : k]
            return 1.0 - normal.cdf(threshold - clean)
        top = torch.topk(noisy, k + 1, dim=1).values
        is_in = noisy >= top[:, k - 1 : k]
        threshold = torch.where(is_in, top[:, k : k + 1], top[:, k - 1 : k])
        return normal.cdf(clean - threshold)

    def expert_kernels(self) -> torch.Tensor:
        """Expert weights [E, F, C, k, k] (detached), for comparing with known stencils."""
        weight = self.experts.weight.detach()
        return weight.view(self.routing.experts, self.filters, *weight.shape[1:])


class SMoENet(nn.Module):
    """Hidden SMoE layers (concatenating their K selections) and a final SMoE layer that sums
    its K selections into one output channel. The paper's heat run is just the final layer.
    """

    def __init__(
        self,
        in_channels: int,
        height: int,
        width: int,
        mask: torch.Tensor | None = None,
        hidden_layers: list[dict[str, int]] | None = None,
        hidden_activation: str = "relu",
        filters: int = 1,
        kernel_size: int = 3,
        gate: str = "latent",
        gate_options: dict[str, Any] | None = None,
        mask_input: bool = False,
        orthogonal: bool = False,
        aux: dict[str, float] | None = None,
        expert_init: str = "reference",
        **routing: Any,
    ) -> None:
        super().__init__()
        known = {f.name for f in fields(RoutingOptions)}
        unknown = set(routing) - known
        if unknown:
            raise TypeError(f"unexpected options {sorted(unknown)}")
        self.activation = make_activation(hidden_activation)
        if mask is not None:
            region = torch.as_tensor(mask, dtype=torch.float32)
            self.register_buffer("region_map", (region / max(float(region.max()), 1.0))[None, None])
        else:
            self.region_map = None
        if mask_input and mask is None:
            raise InputError("mask_input needs the region map")
        shared = dict(
            kernel_size=kernel_size,
            gate=gate,
            gate_options=gate_options,
            mask_input=mask_input,
            orthogonal=orthogonal,
            mask=mask,
            aux=aux,
            expert_init=expert_init,
        )
        layers = []
        channels = in_channels
        for index, spec in enumerate(hidden_layers or []):
            spec = dict(spec)
            unknown = set(spec) - {"experts", "k", "filters"}
            if unknown:
                raise InputError(f"hidden_layers[{index}]: unknown keys {sorted(unknown)}")
            options = RoutingOptions(
                **{
                    **routing,
                    "experts": spec.get("experts", routing.get("experts", 3)),
                    "k": spec.get("k", routing.get("k", 1)),
                }
            ).validate(f"hidden_layers[{index}]")
            layer = SMoELayer(
                channels,
                height,
                width,
                options,
                filters=spec.get("filters", 1),
                combine="concat",
                final=False,
                **shared,
            )
            layers.append(layer)
            channels = layer.out_channels
        final = RoutingOptions(**routing).validate("smoe")
        layers.append(
            SMoELayer(channels, height, width, final, filters=filters, combine="sum", **shared)
        )
        self.layers = nn.ModuleList(layers)
        if self.layers[-1].out_channels != 1:
            raise InputError(f"the final SMoE layer must give 1 channel, got filters={filters}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x, self.region_map)
            if index < len(self.layers) - 1:
                x = self.activation(x)
        return x

    @property
    def final(self) -> SMoELayer:
        return self.layers[-1]


def smoe_layers(model: nn.Module) -> list[SMoELayer]:
    return [m for m in model.modules() if isinstance(m, SMoELayer)]


def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of every SMoE layer's auxiliary losses from the last forward pass, or None."""
    terms = [loss for layer in smoe_layers(model) for loss in layer.aux_losses.values()]
    return torch.stack(terms).sum() if terms else None
