"""The Spatial Mixture-of-Experts layer and networks built from it.

Experts are one convolution with E (x F) output channels, evaluated everywhere; a gate scores
each expert at each point and top-K routing keeps K of them per point (see
:mod:`smoe.models.routing` for the backward pass that trains experts and gate). Auxiliary
gate losses are exposed per layer in ``aux_losses`` (already multiplied by their
coefficients) and summed by the trainer, as MoE libraries do.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from torch import nn

from smoe.errors import InputError
from smoe.models.gates import build_gate
from smoe.models.layers import make_activation
from smoe.models.routing import RoutingOptions, route

AUX_LOSSES = ("importance", "load", "spatial")


def coefficient_of_variation_squared(values: torch.Tensor) -> torch.Tensor:
    """CV^2 = var / mean^2: zero when every expert gets the same share."""
    return values.var(unbiased=False) / (values.mean() ** 2 + 1e-10)


EXPERT_INITS = ("default", "identity")


@torch.no_grad()
def init_experts(weight: torch.Tensor, how: str, experts: int) -> None:
    """``default`` keeps PyTorch's init; ``identity`` starts every expert filter near the
    identity (the persistence predictor) with small random deviations, the natural start for
    an operator that advances a field by one time step.
    """
    if how not in EXPERT_INITS:
        raise InputError(f"expert_init {how!r} is not one of {EXPERT_INITS}")
    if how == "identity":
        out_channels, in_channels, height, width = weight.shape
        weight.uniform_(-0.01, 0.01)
        weight[:, 0, height // 2, width // 2] += 1.0


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
        expert_init: str = "default",
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
        if "load" in self.aux and not (routing.noise and routing.experts > routing.k):
            raise InputError("the load loss needs noise: true and more experts than k")
        self.experts = nn.Conv2d(
            in_channels,
            routing.experts * filters,
            kernel_size,
            padding=kernel_size // 2,
            bias=False,
        )
        init_experts(self.experts.weight, expert_init, routing.experts)
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

    @property
    def out_channels(self) -> int:
        per_selection = self.filters
        return per_selection if self.combine == "sum" else per_selection * self.routing.k

    def forward(self, x: torch.Tensor, mask_channel: torch.Tensor | None = None) -> torch.Tensor:
        batch, _, height, width = x.shape
        expert_out = self.experts(x).view(batch, self.routing.experts, self.filters, height, width)
        logits = self.gate(x, mask_channel)
        self.stats = {}
        out, idx, scores = route(expert_out, logits, self.routing, self.training, self.stats)
        self.last_selection = idx.detach()
        self.aux_losses = self._aux_losses(logits.float(), scores) if self.aux else {}
        if self.combine == "sum":
            return out.sum(dim=1)
        return out.flatten(1, 2)

    def _aux_losses(self, logits: torch.Tensor, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        losses = {}
        probs = torch.softmax(logits, dim=1)
        if "importance" in self.aux:
            importance = probs.sum(dim=(0, 2, 3))
            losses["importance"] = self.aux["importance"] * coefficient_of_variation_squared(
                importance
            )
        if "load" in self.aux:
            losses["load"] = self.aux["load"] * coefficient_of_variation_squared(
                self._smooth_load(logits, scores)
            )
        if "spatial" in self.aux:
            vertical = (probs[:, :, 1:, :] - probs[:, :, :-1, :]).pow(2).sum(1).mean()
            horizontal = (probs[:, :, :, 1:] - probs[:, :, :, :-1]).pow(2).sum(1).mean()
            losses["spatial"] = self.aux["spatial"] * (vertical + horizontal) / 2
        return losses

    def _smooth_load(self, clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        """Expected number of points per expert under the gate noise (Shazeer et al. 2017).

        P(expert e stays in the top K if its noise were redrawn) = Phi((clean_e - t_e) / s),
        with t_e the K-th largest noisy score among the other experts.
        """
        k = self.routing.k
        top = torch.topk(noisy, k + 1, dim=1).values
        threshold_if_in = top[:, k : k + 1]
        threshold_if_out = top[:, k - 1 : k]
        is_in = noisy >= threshold_if_out
        threshold = torch.where(is_in, threshold_if_in, threshold_if_out)
        normal = torch.distributions.Normal(0.0, 1.0 / self.routing.experts)
        return normal.cdf(clean - threshold).sum(dim=(0, 2, 3))

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
        expert_init: str = "default",
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
