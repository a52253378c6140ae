"""The Spatial Mixture-of-Experts layer as a plain PyTorch API, for use in your own network.

>>> from smoe.nn import SMoE
>>> layer = SMoE(in_channels=1, height=64, width=64, experts=3, k=1)

``SMoE`` maps ``x`` of shape [B, C, H, W] (H, W fixed at construction: the latent gate learns
one score per expert and point) to [B, filters, H, W], the K selected experts' outputs summed
(``combine="sum"``), or to [B, K * filters, H, W] (``combine="concat"``). Each expert is one
``kernel_size`` x ``kernel_size`` convolution without bias (``filters`` output channels per
expert), evaluated at every point; at each point the gate's K highest-scoring experts are kept.

Its training signals need nothing from your loop:

* expert error damping (``damping=True``) and the routing-classification loss
  (``rc_loss=True``) happen inside ``loss.backward()``: the per-point error is read from the
  gradient reaching the layer, the experts' gradient is damped where a point looks
  misrouted, and the gate receives the gradient of BCE-with-logits between its scores and
  labels saying which selections were good (instead of the task gradient);
* the RC loss value and the fraction of damped points of the last backward are in
  ``layer.stats`` (for logging);
* optional auxiliary gate losses (``aux={"importance": 0.01, ...}``) are in
  ``layer.aux_losses`` after each training forward; add ``auxiliary_loss(model)`` to your
  loss;
* with fp16 and ``torch.amp.GradScaler`` call ``set_loss_scale(model, scaler)`` once, so the
  routing sees the true gradient rather than the scaled one.

The per-point error assumes a mean-squared-error loss on this layer's output (``error_scale
="mse"``: |dL/dout| * N / 2 = |out - y|); only the small fixed offsets of the thresholds
depend on that, so other losses work too, or pass a number as ``error_scale``.
"""

from __future__ import annotations

from typing import Any

import torch

from smoe.nn.gates import GATES, Gate, LatentGate
from smoe.nn.layer import SMoELayer, SMoENet, auxiliary_loss, set_loss_scale, smoe_layers
from smoe.nn.routing import RoutingOptions

__all__ = [
    "GATES",
    "Gate",
    "LatentGate",
    "SMoE",
    "SMoENet",
    "auxiliary_loss",
    "set_loss_scale",
    "smoe_layers",
]


class SMoE(SMoELayer):
    """A spatial mixture-of-experts 2-D layer; see the module docstring for the contract.

    Args:
        in_channels: C of the input [B, C, H, W].
        height, width: H and W, fixed (gates such as the latent one have a score per point).
        experts: E, number of experts.
        k: K <= E experts kept per point.
        filters: output channels of each expert.
        kernel_size: odd size of each expert's convolution ("same" padding).
        gate: one of :data:`GATES` (``latent``, ``conv``, ``conv1``, ``coordconv``,
            ``coordconv-multi``, ``linear``, ``lcn``, ``lcn1``, ``fixed``).
        gate_options: extra arguments of the gate (``bias``, ``init_scale``, ``hidden``).
        combine: ``sum`` adds the K selections, ``concat`` stacks them as channels.
        weighted: multiply each selection by its routing score.
        rc_loss: train the gate with the routing-classification loss.
        damping: damp the experts' gradient at misrouted points (E > K).
        damping_factor: what a misrouted point keeps of its gradient (0: nothing).
        quantile: a point is misrouted when its error is above this per-sample quantile.
        noise: N(0, (1/E)^2) noise on the scores while training.
        activation, absolute, softmax: transforms of the gate's scores before top-K.
        rc_signal: ``score`` (the paper's code) or ``output``; see RoutingOptions.
        error_scale: ``mse`` or a number turning |dL/dout| into the per-point error.
        aux: coefficients of auxiliary gate losses (``importance``, ``load``, ``spatial``,
            ``load_shazeer``, ``smoothness``).
        expert_init: ``reference`` (the paper's code), ``pytorch`` or ``identity``.
        mask: region map [H, W] (for ``gate="fixed"``, or as a gate input channel).
        mask_input: feed ``mask`` to the gate as one more input channel.
        orthogonal: orthogonal initialisation of the gate's weights.
    """

    def __init__(
        self,
        in_channels: int,
        height: int,
        width: int,
        experts: int = 3,
        k: int = 1,
        filters: int = 1,
        kernel_size: int = 3,
        gate: str = "latent",
        gate_options: dict[str, Any] | None = None,
        combine: str = "sum",
        weighted: bool = False,
        rc_loss: bool = True,
        damping: bool = True,
        damping_factor: float = 0.0,
        quantile: float = 0.3,
        noise: bool = False,
        activation: str = "identity",
        absolute: bool = False,
        softmax: bool = False,
        rc_signal: str = "score",
        error_scale: str | float = "mse",
        aux: dict[str, float] | None = None,
        expert_init: str = "reference",
        mask: torch.Tensor | None = None,
        mask_input: bool = False,
        orthogonal: bool = False,
    ) -> None:
        routing = RoutingOptions(
            experts=experts,
            k=k,
            weighted=weighted,
            activation=activation,
            noise=noise,
            absolute=absolute,
            softmax=softmax,
            rc_loss=rc_loss,
            damping=damping,
            damping_factor=damping_factor,
            quantile=quantile,
            error_scale=error_scale,
            rc_signal=rc_signal,
        )
        super().__init__(
            in_channels,
            height,
            width,
            routing,
            filters=filters,
            kernel_size=kernel_size,
            gate=gate,
            gate_options=gate_options,
            mask_input=mask_input,
            orthogonal=orthogonal,
            mask=mask,
            combine=combine,
            aux=aux,
            expert_init=expert_init,
        )
        self._mask_channel = (
            None if mask is None else torch.as_tensor(mask, dtype=torch.float32)[None, None]
        )

    def forward(self, x: torch.Tensor, mask_channel: torch.Tensor | None = None) -> torch.Tensor:
        if mask_channel is None and self._mask_channel is not None:
            mask_channel = self._mask_channel.to(x.device)
        return super().forward(x, mask_channel)

    def routing_map(self) -> torch.Tensor | None:
        """The experts chosen in the last forward pass, [B, K, H, W] (None before one)."""
        return self.last_selection
