"""Top-K routing with a straight-through backward, RC loss and expert error damping.

The forward pass picks, at every point, the K experts with the highest routing scores and
gathers their outputs. The backward pass is written by hand (:class:`RouteFunction`) because
the paper's training signals live there:

* the output gradient goes back to the selected experts only (times the score if weighted),
  multiplied by ``damping`` where the point's error says it is misrouted;
* the gate gets either the task gradient (straight through; times the expert output if
  weighted) or, with the routing-classification (RC) loss, no task gradient at all and
  instead the gradient of BCE-with-logits between its logits and labels saying which
  selections were good. Computing that gradient here costs no second backward pass.

Routing runs in float32 even under autocast: top-K over half-precision scores is where
mixed precision flips decisions. Under loss scaling (``torch.amp.GradScaler``) the output
gradient arriving here is the true one times the scale S; the per-point error is divided by
S before its thresholds are applied and the injected RC gradient is multiplied by S, so the
scaler's unscale leaves every decision and gradient exactly as without scaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from smoe.core.errors import InputError
from smoe.nn import routing_cpu

ACTIVATIONS = ("identity", "sigmoid", "relu", "tanh")
RC_SIGNALS = ("score", "output")
"""Which gradient the RC labels are judged by: ``score`` is dL/d(selected score), i.e. the
output gradient times the selected expert's output when routing is weighted (the paper's
reference code); ``output`` is |dL/dout| itself. They differ only for weighted routing."""
RC_TOLERANCE = 1e-5
"""A selection is correct when its error is at most quantile + this (the paper's value)."""
DAMPING_TOLERANCE = 1e-3
"""A point is misrouted when its error is above quantile + this (the paper's value)."""


@dataclass(frozen=True)
class RoutingOptions:
    """How one SMoE layer turns gate logits into a selection and trains it."""

    experts: int = 3
    k: int = 1
    weighted: bool = False
    activation: str = "identity"
    noise: bool = False
    absolute: bool = False
    softmax: bool = False
    rc_loss: bool = False
    rc_weight: float = 1.0
    damping: bool = False
    damping_factor: float = 0.0
    quantile: float = 0.3
    error_scale: str | float = "mse"
    rc_signal: str = "score"

    def validate(self, where: str = "smoe") -> RoutingOptions:
        if self.experts < 1:
            raise InputError(f"{where}: experts must be at least 1, got {self.experts}")
        if not 1 <= self.k <= self.experts:
            raise InputError(
                f"{where}: k={self.k} must be between 1 and experts={self.experts} (K <= E)"
            )
        if self.activation not in ACTIVATIONS:
            raise InputError(
                f"{where}: routing activation {self.activation!r} is not one of {ACTIVATIONS}"
            )
        if not 0.0 <= self.quantile <= 1.0:
            raise InputError(f"{where}: quantile must be in [0, 1], got {self.quantile}")
        if not 0.0 <= self.damping_factor <= 1.0:
            raise InputError(
                f"{where}: damping_factor must be in [0, 1], got {self.damping_factor}"
            )
        if isinstance(self.error_scale, str) and self.error_scale != "mse":
            raise InputError(f"{where}: error_scale must be 'mse' or a number")
        if self.rc_signal not in RC_SIGNALS:
            raise InputError(f"{where}: rc_signal {self.rc_signal!r} is not one of {RC_SIGNALS}")
        return self


def activate_scores(logits: torch.Tensor, options: RoutingOptions) -> torch.Tensor:
    """The optional activation on the gate's logits: the "routing weights" that the
    importance and spatial-agreement losses are computed on."""
    if options.activation == "sigmoid":
        return torch.sigmoid(logits)
    if options.activation == "relu":
        return F.relu(logits)
    if options.activation == "tanh":
        return torch.tanh(logits)
    return logits


def add_noise(scores: torch.Tensor, options: RoutingOptions, training: bool) -> torch.Tensor:
    """Training noise N(0, (1/E)^2); the load loss compares scores before and after it."""
    if options.noise and training:
        return scores + torch.randn_like(scores) / options.experts
    return scores


def finish_scores(noisy: torch.Tensor, options: RoutingOptions) -> torch.Tensor:
    """|.| and softmax over experts, in that order: the scores top-K selects from."""
    scores = noisy.abs() if options.absolute else noisy
    return torch.softmax(scores, dim=1) if options.softmax else scores


def transform_scores(logits: torch.Tensor, options: RoutingOptions, training: bool) -> torch.Tensor:
    """Activation, training noise N(0, (1/E)^2), |.|, softmax over experts, in that order."""
    return finish_scores(add_noise(activate_scores(logits, options), options, training), options)


def per_point_error(signal: torch.Tensor, scale: str | float) -> torch.Tensor:
    """|signal| rescaled to the per-point error, summed over each expert's filters.

    ``signal`` is dL/dout (already divided by any loss scale), or dL/dout times the selected
    expert's output for the RC labels of weighted routing. For a mean-squared-error loss on
    the network output that one selection forms (the final layer sums its K selections),
    dL/dout = 2 (out - y) / N with N the size of one selection, so |out - y| is
    |dL/dout| * N / 2 ("mse"). Only the fixed offsets of the RC and damping thresholds depend
    on the scale; the quantile comparison does not.
    """
    factor = signal[:, 0].numel() / 2.0 if scale == "mse" else float(scale)
    magnitude = signal.abs()
    # a sum over one filter is that filter's value: skip the pass
    summed = magnitude[:, :, 0] if signal.shape[2] == 1 else magnitude.sum(dim=2)
    return summed * factor  # [B, K, H, W]


def sample_quantile(err: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of each sample's errors, shaped to broadcast against ``err``.

    Equals ``torch.quantile`` (linear interpolation between the two order statistics around
    q * (n - 1)) but selects instead of sorting. This runs every training step, where a sort
    (or ``torch.kthvalue``, a third of a CPU step) would dominate a small model: on the CPU
    the two order statistics come from one ``numpy.partition`` and the minimum above it
    (:func:`smoe.nn.routing_cpu.order_statistics`, 10x faster); elsewhere one
    ``kthvalue`` for the lower one, then the next larger value with a masked minimum. Both
    give the same values.
    """
    flat = err.detach().flatten(1)
    position = q * (flat.shape[1] - 1)
    below = int(position)
    fraction = position - below
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        lower, upper = (
            None if statistic is None else torch.from_numpy(statistic)
            for statistic in routing_cpu.order_statistics(flat.numpy(), below, fraction > 0)
        )
    else:
        lower = torch.kthvalue(flat, below + 1, dim=1, keepdim=True).values
        upper = None
        if fraction > 0:
            at_most = (flat <= lower).sum(dim=1, keepdim=True)
            larger = torch.where(flat > lower, flat, torch.inf).amin(dim=1, keepdim=True)
            upper = torch.where(at_most >= below + 2, lower, larger)
    if fraction > 0:
        lower = lower + fraction * (upper - lower)
    return lower.view(-1, *([1] * (err.dim() - 1)))


def batch_shared(scores: torch.Tensor) -> bool:
    """Whether every sample has the same scores (an expanded latent gate): then per-point
    work on the scores is done once for the batch and broadcast."""
    return scores.shape[0] > 1 and scores.stride(0) == 0


def rc_labels(correct: torch.Tensor, idx: torch.Tensor, experts: int) -> torch.Tensor:
    """Labels [B, E, H, W]: 1/0 for selected experts by correctness, the rest share the misses.

    An unselected expert gets (K - #correct selected) / (E - K): where every selection was
    wrong, the gate is told to move probability mass to the others evenly.
    """
    batch, k, height, width = idx.shape
    correct = correct.to(torch.float32)
    if experts > k:
        missing = (k - correct.sum(dim=1, keepdim=True)) / (experts - k)
        labels = missing.expand(batch, experts, height, width).clone()
    else:
        labels = torch.zeros(batch, experts, height, width, device=idx.device)
    return labels.scatter_(1, idx, correct)


def shared_mean_labels(
    correct: torch.Tensor, idx: torch.Tensor, experts: int
) -> torch.Tensor | None:
    """``rc_labels(correct, idx, experts).mean(0, keepdim=True)`` without the labels, or None.

    For one selection shared by the batch (a latent gate, k = 1) the batch mean of the labels
    is the fraction of samples whose selection was correct for the selected expert and
    (B - that count) / (E - 1) / B for the others. Every label is then 0, 1 or 1 / (E - 1),
    and with E - 1 a power of two (E = 2, 3, 5, 9, ...) each sum is exact in float32, so this
    equals the mean of the materialised labels bit for bit; it reads ``correct`` once instead
    of building, scattering and reducing [B, E, H, W] labels every step. Otherwise (None) the
    caller builds the labels.
    """
    if not shared_labels_exact(idx, experts):
        return None
    count = correct.sum(dim=0, keepdim=True, dtype=torch.float32)  # [1, 1, H, W], exact
    return mean_labels_from_count(count, idx, experts)


def shared_labels_exact(idx: torch.Tensor, experts: int) -> bool:
    """Whether :func:`shared_mean_labels` is exact for this selection (see there)."""
    batch, k = idx.shape[:2]
    missing_share = experts - k
    return (
        k == 1
        and missing_share >= 1
        and not missing_share & (missing_share - 1)
        and (batch < 2**24)
    )


def mean_labels_from_count(count: torch.Tensor, idx: torch.Tensor, experts: int) -> torch.Tensor:
    """The batch-mean RC labels [1, E, H, W] from the count of samples whose (shared, top-1)
    selection was correct at each point [1, 1, H, W]."""
    batch, k = idx.shape[:2]
    missing_share = experts - k
    selected = count / batch
    others = (batch - count) * (1.0 / missing_share) / batch
    chosen = idx[:1] == torch.arange(experts, device=idx.device).view(1, experts, 1, 1)
    return torch.where(chosen, selected, others)


def rc_gradient(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    weight: float,
    mean_label: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient and value of weight * mean BCE-with-logits(logits, labels).

    BCE(x, l) = softplus(x) - l x. When the logits are shared by the batch (latent gate),
    both are computed on one copy with the batch-mean label (``mean_label`` when the caller
    has it, see :func:`shared_mean_labels`): the expanded gradient sums over the batch to
    the same total, at a fraction of the cost.
    """
    scale = weight / logits.numel()
    if batch_shared(logits):
        batch = logits.shape[0]
        if mean_label is None:
            mean_label = labels.mean(dim=0, keepdim=True)
        single = logits[:1]
        grad = ((torch.sigmoid(single) - mean_label) * scale).expand(batch, -1, -1, -1)
        loss = (F.softplus(single) - mean_label * single).mean()
    else:
        grad = (torch.sigmoid(logits) - labels) * scale
        loss = (F.softplus(logits) - labels * logits).mean()
    return grad, (loss * weight).detach()


class RouteFunction(torch.autograd.Function):
    """out[b, k] = Y[b, idx[b, k]] (* vals), with the SMoE straight-through backward.

    Inputs: ``expert_out`` [B, E, F, H, W] (float32), ``logits`` [B, E, H, W] (the gate's raw
    output, which receives the RC gradient), ``scores`` [B, E, H, W] (transformed logits, which
    receive the task gradient), a ``stash`` dict where the backward leaves the RC loss value
    and the misrouted fraction for logging, and ``loss_scale``: the factor S the loss was
    multiplied by before backward (a 0-dim tensor, or None for 1).
    """

    @staticmethod
    def forward(
        ctx,
        expert_out,
        logits,
        scores,
        options: RoutingOptions,
        stash: dict[str, Any],
        loss_scale: torch.Tensor | None = None,
    ):
        shared = batch_shared(scores)
        select_from = scores[:1] if shared else scores
        if options.k == 1:  # max is several times faster than topk for one selection
            vals, idx = select_from.max(dim=1, keepdim=True)
        else:
            vals, idx = torch.topk(select_from, options.k, dim=1)  # [B, K, H, W]
        if shared:
            batch = scores.shape[0]
            vals, idx = vals.expand(batch, -1, -1, -1), idx.expand(batch, -1, -1, -1)
        gather_idx = idx.unsqueeze(2).expand(-1, -1, expert_out.shape[2], -1, -1)
        selected = torch.gather(expert_out, 1, gather_idx)  # [B, K, F, H, W]
        out = selected * vals.unsqueeze(2) if options.weighted else selected
        ctx.save_for_backward(logits, vals, idx, selected)
        ctx.options = options
        ctx.stash = stash
        ctx.loss_scale = loss_scale
        ctx.expert_shape = expert_out.shape
        ctx.mark_non_differentiable(idx)
        return out, idx

    @staticmethod
    def backward(ctx, grad_out, _grad_idx):
        logits, vals, idx, selected = ctx.saved_tensors
        options: RoutingOptions = ctx.options
        loss_scale = ctx.loss_scale
        damp = options.damping and options.experts > options.k
        if fused_cpu_applies(grad_out, logits, idx, options, loss_scale):
            return _fused_cpu_backward(ctx, grad_out, logits, idx, options, damp)
        if damp or options.rc_loss:
            true_grad = grad_out if loss_scale is None else grad_out / loss_scale
            err = per_point_error(true_grad, options.error_scale)
            threshold = sample_quantile(err, options.quantile)

        expert_grad = grad_out
        if damp:
            misrouted = (err > threshold + DAMPING_TOLERANCE).unsqueeze(2)
            expert_grad = damp_misrouted(expert_grad, misrouted, options.damping_factor)
            ctx.stash["misrouted_fraction"] = misrouted.sum() / misrouted.numel()
        if options.weighted:
            expert_grad = expert_grad * vals.unsqueeze(2)
        grad_experts = scatter_selected(expert_grad, idx, ctx.expert_shape)

        grad_scores = grad_logits = None
        if options.rc_loss:
            if options.weighted and options.rc_signal == "score":
                err = per_point_error(true_grad * selected, options.error_scale)
                threshold = sample_quantile(err, options.quantile)
            correct = err <= threshold + RC_TOLERANCE
            mean_label = None
            if batch_shared(logits) and idx.stride(0) == 0:
                mean_label = shared_mean_labels(correct, idx, options.experts)
            labels = None if mean_label is not None else rc_labels(correct, idx, options.experts)
            grad_logits, loss = rc_gradient(logits, labels, options.rc_weight, mean_label)
            if loss_scale is not None:  # the scaler divides every gradient by S again
                grad_logits = grad_logits * loss_scale
            ctx.stash["routing_classification"] = loss
        elif ctx.needs_input_grad[2]:
            per_selection = grad_out * selected if options.weighted else grad_out
            grad_scores = torch.zeros_like(logits)
            grad_scores.scatter_(1, idx, per_selection.sum(dim=2))
        return grad_experts, grad_logits, grad_scores, None, None, None


def fused_cpu_applies(
    grad_out: torch.Tensor,
    logits: torch.Tensor,
    idx: torch.Tensor,
    options: RoutingOptions,
    loss_scale: torch.Tensor | None = None,
) -> bool:
    """Whether the backward can run as :mod:`smoe.nn.routing_cpu`'s one compiled loop:
    the paper's final layer on the CPU (latent gate shared by the batch, top-1, unweighted,
    one filter per expert, RC loss with exact label means, no loss scale)."""
    return (
        routing_cpu.available()
        and grad_out.device.type == "cpu"
        and grad_out.dtype == torch.float32
        and options.k == 1
        and options.rc_loss
        and not options.weighted
        and loss_scale is None
        and grad_out.shape[2] == 1
        and batch_shared(logits)
        and idx.stride(0) == 0
        and shared_labels_exact(idx, options.experts)
    )


def _fused_cpu_backward(ctx, grad_out, logits, idx, options: RoutingOptions, damp: bool):
    """:meth:`RouteFunction.backward` through :func:`routing_cpu.top1_shared_backward`: the
    same gradients and logged values bit for bit."""
    scale = options.error_scale
    error_factor = grad_out[:, 0].numel() / 2.0 if scale == "mse" else float(scale)
    grad_experts, count, misrouted = routing_cpu.top1_shared_backward(
        grad_out,
        idx,
        options.experts,
        error_factor,
        options.quantile,
        damp,
        DAMPING_TOLERANCE,
        options.damping_factor,
        RC_TOLERANCE,
    )
    if damp:  # as misrouted.sum() / misrouted.numel() of the torch path
        points = grad_out.shape[0] * grad_out.shape[3] * grad_out.shape[4]
        ctx.stash["misrouted_fraction"] = torch.tensor(misrouted) / points
    mean_label = mean_labels_from_count(count, idx, options.experts)
    grad_logits, loss = rc_gradient(logits, None, options.rc_weight, mean_label)
    ctx.stash["routing_classification"] = loss
    return grad_experts, grad_logits, None, None, None, None


def damp_misrouted(grad: torch.Tensor, misrouted: torch.Tensor, factor: float) -> torch.Tensor:
    """``grad`` times ``factor`` where ``misrouted``, unchanged elsewhere.

    Written as products with 0/1 masks: the same values as ``masked_fill`` / ``where`` (a
    damped zero may come out as -0.0, which compares and adds as 0.0), at a fraction of
    their cost on the CPU, where both run unvectorised every step.
    """
    keep = (~misrouted).to(grad.dtype)  # float masks: a bool operand costs a cast pass
    if factor == 0.0:
        return grad * keep
    return grad * (keep + misrouted.to(grad.dtype) * factor)  # exactly 1 or factor


def scatter_selected(
    expert_grad: torch.Tensor, idx: torch.Tensor, expert_shape: torch.Size
) -> torch.Tensor:
    """The gradient of every expert's output [B, E, F, H, W]: ``expert_grad`` [B, K, F, H, W]
    where an expert was selected, zero elsewhere.

    For one selection this is one product with the 0/1 choice mask, a single pass writing
    the result instead of zero-filling it and scattering into it; the values are the same
    (an unselected zero may be -0.0, which compares and adds as 0.0).
    """
    if idx.shape[1] == 1:
        experts = expert_shape[1]
        shared = idx[:1] if idx.shape[0] > 1 and idx.stride(0) == 0 else idx  # latent gate
        chosen = shared.unsqueeze(2) == torch.arange(experts, device=idx.device).view(
            1, experts, 1, 1, 1
        )
        return expert_grad * chosen.to(expert_grad.dtype)
    grad = torch.zeros(expert_shape, dtype=expert_grad.dtype, device=expert_grad.device)
    gather_idx = idx.unsqueeze(2).expand(-1, -1, expert_shape[2], -1, -1)
    return grad.scatter_(1, gather_idx, expert_grad)


@dataclass
class Routing:
    """What :func:`route` computed: the selection and the scores at each stage."""

    out: torch.Tensor
    """selected expert outputs [B, K, F, H, W] (times the scores if weighted)"""
    idx: torch.Tensor
    """selected experts [B, K, H, W]"""
    activated: torch.Tensor
    """logits after the activation: what importance and spatial agreement are computed on"""
    noisy: torch.Tensor
    """activated plus training noise: what the load loss compares ``activated`` with"""
    scores: torch.Tensor
    """the final scores top-K selected from"""


def route(
    expert_out: torch.Tensor,
    logits: torch.Tensor,
    options: RoutingOptions,
    training: bool,
    stash: dict[str, Any],
    loss_scale: torch.Tensor | None = None,
) -> Routing:
    """Select and gather in float32 (see :class:`RouteFunction` for ``loss_scale``)."""
    device_type = expert_out.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        logits32 = logits.float()
        activated = activate_scores(logits32, options)
        noisy = add_noise(activated, options, training)
        scores = finish_scores(noisy, options)
        out, idx = RouteFunction.apply(
            expert_out.float(), logits32, scores, options, stash, loss_scale
        )
    return Routing(out, idx, activated, noisy, scores)
