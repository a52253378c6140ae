"""Models of the synthetic-cluster family (Chen et al., NeurIPS 2022, "Towards Understanding
Mixture of Experts in Deep Learning"), written from the project's spec of the paper and its
official code.

Inputs are ``x`` of shape [N, P, d] (P patches of dimension d), labels in {0, 1}.

* :class:`PatchCNN` is the paper's two-layer CNN over patches: filter j of class c gives
  sigma(<w_j, x_p> + b_j) at every patch p, and the logit of class c is the sum over its filters
  and the patches; sigma is z^3 (``cubic``, the "nonlinear" model) or z (``linear``). It is the
  MoE's expert (16 filters, 8 per class) and the single-model baseline (80 / 128 / 512 filters).
* :class:`ClusterRouter` is the linear router h(x) = sum_p x_p @ Theta, Theta [d, M] starting
  at zero.
* :class:`ClusterMoE` routes each sample to its top-1 expert of h plus U[0, 1)^M noise and
  multiplies that expert's logits by the chosen (noisy) router score, with no softmax over
  experts, as the official code does.
* :class:`NormalizedGD` trains the experts by normalised gradient descent (each expert's
  gradient divided by the sum of that expert's parameter-gradient norms) and, in the same
  optimiser, the router by plain gradient descent; :func:`cluster_optimizer` builds the
  paper's optimiser for either model.
* :func:`cluster_loss` is the official code's MoE loss: cross-entropy of the softmax of the
  logits; :func:`single_loss` the official singles' plain cross-entropy of the logits;
  :func:`loss_function` picks the one of a model.

Randomness: the router noise is drawn from ``ClusterMoE.generator`` when one is set (a
``torch.Generator`` on the scores' device; the trainer gives it its own seeded stream,
``trainer.stream("router_noise")``, independent of the generator that drew the initial
weights and saved with every checkpoint, so a resumed run draws the same noise as an
uninterrupted one), otherwise from PyTorch's global generator.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from smoe.core.errors import InputError

ACTIVATIONS = ("cubic", "linear")
"""sigma of the CNN filters: z^3 (the paper's "nonlinear" models) or z ("linear")."""

EXPERT_LR = 1e-3
"""Normalised gradient descent step of the MoE's experts."""
ROUTER_LR = 0.1
"""Plain gradient descent step of the MoE's router."""
SINGLE_LR = {"linear": 3e-3, "cubic": 1e-2}
"""Adam learning rate of the single-CNN baselines, by activation."""
SINGLE_WEIGHT_DECAY = 5e-4
"""Adam weight decay of the single-CNN baselines."""


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


def _non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise InputError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise InputError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")


def _check_input(x: torch.Tensor, dim: int) -> None:
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"expected x of shape [N, P, {dim}], got {list(x.shape)}")


@torch.no_grad()
def default_uniform_(weight: torch.Tensor, bias: torch.Tensor | None, scale: float) -> None:
    """PyTorch's default init of ``nn.Linear`` / ``nn.Conv1d`` (weight and bias uniform in
    +-1/sqrt(fan_in), drawn in that order), then both multiplied by ``scale``.

    The official code builds the filters as ``nn.Conv1d(1, F, d, stride=d)`` and multiplies
    its weight and bias by 0.001; a weight [F, d] here draws the same numbers.
    """
    fan_in = weight.shape[-1]
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # bound sqrt(6 / 6 fan_in) = 1/sqrt(fan_in)
    if bias is not None:
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(bias, -bound, bound)
    weight.mul_(scale)
    if bias is not None:
        bias.mul_(scale)


def patch_logits(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    classes: int,
) -> torch.Tensor:
    """logit_c = sum over class c's filters j and the patches p of sigma(<w_j, x_p> + b_j).

    ``x`` [N, P, d], ``weight`` [F, d], ``bias`` [F] or None -> [N, classes]; filters
    0..F/C-1 belong to class 0, the next F/C to class 1, and so on. A linear sigma lets the
    sums move inside: <sum_j w_j, sum_p x_p> + P sum_j b_j, the same function (and gradient)
    at a quarter of the cost for P = 4, equal up to float rounding.
    """
    n, patches, dim = x.shape
    per_class = weight.shape[0] // classes
    if activation == "linear":
        logits = x.sum(dim=1) @ weight.view(classes, per_class, dim).sum(dim=1).t()
        if bias is not None:
            logits = logits + patches * bias.view(classes, per_class).sum(dim=1)
        return logits
    flat = x.reshape(n * patches, dim)
    pre = flat @ weight.t() if bias is None else torch.addmm(bias, flat, weight.t())
    return pre.pow(3).view(n, patches, classes, per_class).sum(dim=(1, 3))


class PatchCNN(nn.Module):
    """The paper's CNN over patches: [N, P, dim] -> logits [N, classes].

    logit_c = sum over class c's filters j and the patches p of sigma(<w_j, x_p> + b_j).

    Args:
        dim: d, the dimension of one patch.
        filters_per_class: filters of each class (the expert: 8, the default; singles: 40 /
            64 / 256 for the paper's 80 / 128 / 512 filters).
        classes: number of classes (2 in the paper).
        activation: ``cubic`` (sigma = z^3) or ``linear`` (sigma = z).
        init_scale: factor on PyTorch's default uniform init of weights and biases (the
            official experts: 1e-3; the official singles keep the default, 1).
        bias: trainable filter biases (the official code has them).
    """

    def __init__(
        self,
        dim: int,
        filters_per_class: int = 8,
        classes: int = 2,
        activation: str = "cubic",
        init_scale: float = 1e-3,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.dim = _positive_int("dim", dim)
        self.filters_per_class = _positive_int("filters_per_class", filters_per_class)
        self.classes = _positive_int("classes", classes)
        _check_activation(activation)
        self.activation = activation
        scale = _non_negative("init_scale", init_scale)
        filters = self.filters_per_class * self.classes
        self.weight = nn.Parameter(torch.empty(filters, self.dim))
        self.bias = nn.Parameter(torch.empty(filters)) if bias else None
        default_uniform_(self.weight, self.bias, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.dim)
        return patch_logits(x, self.weight, self.bias, self.activation, self.classes)


class ClusterRouter(nn.Module):
    """The paper's linear router: h(x) = sum_p x_p @ Theta, [N, P, dim] -> [N, experts].

    Theta [dim, experts] has no bias and starts at zero (so every expert is equally likely
    at first and the router noise alone decides the early dispatch).
    """

    def __init__(self, dim: int, experts: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(
            torch.zeros(_positive_int("dim", dim), _positive_int("experts", experts))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=1) @ self.theta


class ClusterMoE(nn.Module):
    """The paper's mixture of CNN experts with a noisy top-k linear router.

    Forward on ``x`` [N, P, dim]: h = router(x) [N, M]; where noise is on (training with
    ``train_noise``, evaluation with ``test_noise``) u ~ U[0, 1)^M is added, s = h + u; the
    top-k experts of s are chosen and the output is sum over chosen m of s_m * f_m(x), the
    chosen score (noise included) multiplying the expert's logits directly, with no softmax
    over experts. For k = 1 this is the paper's (h_m* + u_m*) f_m*(x).

    After each forward, ``last_dispatch`` [N] (long) holds each sample's first choice (its
    expert for k = 1), ``last_selection`` [N, k] all its choices, and ``aux_losses`` the
    load-balancing loss times its coefficient (training only, when the coefficient is > 0).

    Args:
        dim: d, the dimension of one patch.
        experts: M, number of experts (the paper: 8).
        filters_per_class: filters of each class in each expert (the paper: 8).
        activation: ``cubic`` or ``linear`` experts.
        init_scale: factor on the experts' default init (the paper: 1e-3).
        top_k: experts per sample, 1 <= k <= M (the paper: 1).
        train_noise: add U[0, 1)^M to the router scores while training (the paper: yes).
        test_noise: also at evaluation (the official code keeps it on; ours is off by default
            so that evaluation is deterministic; the spec measured at most 0.27 points).
        load_balancing: coefficient of the load-balancing loss (the paper's runs: 0, off);
            see :meth:`load_balancing_loss` for its form.
        classes: number of classes (2).
        bias: trainable expert filter biases.
    """

    def __init__(
        self,
        dim: int,
        experts: int = 8,
        filters_per_class: int = 8,
        activation: str = "cubic",
        init_scale: float = 1e-3,
        top_k: int = 1,
        train_noise: bool = True,
        test_noise: bool = False,
        load_balancing: float = 0.0,
        classes: int = 2,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.dim = _positive_int("dim", dim)
        self.num_experts = _positive_int("experts", experts)
        self.top_k = _positive_int("top_k", top_k)
        if self.top_k > self.num_experts:
            raise InputError(f"top_k={top_k} must be between 1 and experts={experts} (k <= M)")
        for name, flag in (("train_noise", train_noise), ("test_noise", test_noise)):
            if not isinstance(flag, bool):
                raise InputError(f"{name} must be true or false, got {flag!r}")
        self.train_noise = train_noise
        self.test_noise = test_noise
        self.load_balancing = _non_negative("load_balancing", load_balancing)
        self.router = ClusterRouter(self.dim, self.num_experts)
        self.experts = nn.ModuleList(
            PatchCNN(self.dim, filters_per_class, classes, activation, init_scale, bias)
            for _ in range(self.num_experts)
        )
        self.classes = self.experts[0].classes
        self.generator: torch.Generator | None = None
        """Source of the router noise; None: PyTorch's global generator."""
        self.last_dispatch: torch.Tensor | None = None
        self.last_selection: torch.Tensor | None = None
        self.aux_losses: dict[str, torch.Tensor] = {}

    @property
    def noisy(self) -> bool:
        """Whether the next forward adds router noise (depends on train / eval mode)."""
        return self.train_noise if self.training else self.test_noise

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        """U[0, 1) noise of ``like``'s shape, dtype and device, drawn from ``generator``
        (which must live on that device: a CUDA draw from a CPU generator is refused by
        PyTorch, and a draw on one device then copied would tie the numbers to it), or from
        PyTorch's global generator when none is set."""
        if self.generator is None:
            return torch.rand(like.shape, device=like.device, dtype=like.dtype)
        if self.generator.device.type != like.device.type:
            raise ValueError(
                f"the router noise generator lives on {self.generator.device}, the router "
                f"scores on {like.device}: give the model a generator on the scores' device"
            )
        return torch.rand(
            like.shape, generator=self.generator, device=like.device, dtype=like.dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.dim)
        scores = self.router(x)  # [N, M]
        if self.noisy:
            scores = scores + self._noise(scores)
        gate, selection = scores.topk(self.top_k, dim=1)  # [N, k] each
        self.last_selection = selection.detach()
        self.last_dispatch = self.last_selection[:, 0]
        out = self._indexed(x, gate, selection)
        self.aux_losses = {}
        if self.training and self.load_balancing > 0:
            loss = self.load_balancing_loss(scores, selection)
            self.aux_losses["load_balancing"] = self.load_balancing * loss
        return out

    def _indexed(
        self, x: torch.Tensor, gate: torch.Tensor, selection: torch.Tensor
    ) -> torch.Tensor:
        """Each expert on the samples routed to it; experts with none are not run.

        Measured against running every expert on every sample in one batched einsum and
        gathering the chosen ones (the same numbers up to float rounding): a full-batch
        training step on 16,000 samples, one CPU thread, takes 20 ms this way and 76 ms
        dense (cubic experts), since top-1 runs each sample through one expert, not M.
        """
        out = x.new_zeros(x.shape[0], self.classes)
        for m, expert in enumerate(self.experts):
            rows, slots = (selection == m).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            weighted = gate[rows, slots, None] * expert(x[rows])
            out = out.index_add(0, rows, weighted)
        return out

    def load_balancing_loss(self, scores: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
        """Switch-Transformer load balancing: M^2 * mean_m(density_m * P_m) = M sum_m f_m P_m.

        density_m is the share of the batch's choices that went to expert m (not
        differentiable) and P_m the mean over the batch of softmax(s)_m, s the (noisy) router
        scores; the loss is 1 when both are uniform. The official code has the same formula
        with the raw scores h in place of softmax(s); without a softmax nothing bounds it
        below (moving every column of Theta against the mean input lowers it without limit,
        and since the output is s * f, that also rescales the logits), so we take the
        standard Switch form, bounded in [0, M]: 1 for uniform routing, M when every choice
        goes to one expert with certainty.
        """
        experts = self.num_experts
        counts = F.one_hot(selection, experts).sum(dim=(0, 1)).to(scores.dtype)
        density = counts / selection.numel()
        proxy = torch.softmax(scores, dim=1).mean(dim=0)
        return experts * experts * (density * proxy).mean()

    def aux_loss(self) -> torch.Tensor | None:
        """The auxiliary losses of the last training forward, summed; None when there are none."""
        terms = list(self.aux_losses.values())
        return torch.stack(terms).sum() if terms else None


def cluster_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the softmax of the logits, as the official code computes the MoE's
    loss (its single CNNs are trained on :func:`single_loss`).

    ``F.cross_entropy`` applies a log-softmax itself, so this is a softmax applied twice: the
    loss is bounded below by log(1 + e^-1) = 0.3133 for two classes (a confident correct
    prediction gives probabilities (1, 0), whose softmax is (e, 1) / (e + 1)), and its
    gradient vanishes for confident predictions, right or wrong. We keep it because it is the
    loss behind the published figures (their early stopping at loss 0.314 relies on the
    floor), and it changes the dynamics: the experts' gradients stay small.
    """
    return F.cross_entropy(torch.softmax(logits, dim=1), labels)


def single_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits, as the official code trains (and we validate) a single
    CNN: the 2-vector its filters sum to is used directly as the logits, with no extra
    softmax, so unlike :func:`cluster_loss` this loss goes to 0 for confident, correct
    predictions."""
    return F.cross_entropy(logits, labels)


def loss_function(model: nn.Module):
    """The official code's training loss of a cluster model: :func:`cluster_loss` (softmax,
    then cross-entropy) for the :class:`ClusterMoE`, :func:`single_loss` (plain cross-entropy)
    for a single :class:`PatchCNN`."""
    if isinstance(model, ClusterMoE):
        return cluster_loss
    if isinstance(model, PatchCNN):
        return single_loss
    raise TypeError(f"no cluster loss for {type(model).__name__}")


class NormalizedGD(torch.optim.Optimizer):
    """Normalised gradient descent per parameter group, plain gradient descent optionally.

    In a group with ``normalize=True`` (one group per expert) every parameter steps by
    ``-lr * grad / sum_q ||grad_q||``, the sum over the group's parameters that have a
    gradient (an expert's weight and bias); a group whose gradients are all zero or absent
    does not move. A group with ``normalize=False`` steps by ``-lr * grad`` (the router).
    The optimiser keeps no state besides its groups' settings, so ``state_dict`` /
    ``load_state_dict`` restore it exactly.
    """

    def __init__(self, params: Iterable[Any], lr: float = EXPERT_LR, normalize: bool = True):
        if not lr >= 0:
            raise ValueError(f"invalid learning rate {lr!r}")
        super().__init__(params, {"lr": lr, "normalize": normalize})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["normalize"]:
                norm = torch.stack([torch.linalg.vector_norm(g) for g in grads]).sum()
                # No step where every gradient is zero (no sample reached the expert); chosen
                # on the device, without reading the norm back to the host.
                scale = torch.where(norm > 0, -group["lr"] / norm, torch.zeros_like(norm))
                for p, g in zip(params, grads, strict=True):
                    p.add_(g * scale.to(g.dtype))
            else:
                for p, g in zip(params, grads, strict=True):
                    p.add_(g, alpha=-group["lr"])
        return loss


def cluster_optimizer(
    model: nn.Module,
    lr: float | None = None,
    router_lr: float | None = None,
    weight_decay: float | None = None,
) -> torch.optim.Optimizer:
    """The paper's optimiser for a cluster model, as one ``torch.optim.Optimizer``.

    * :class:`ClusterMoE`: :class:`NormalizedGD` with one normalised group per expert (step
      ``lr``, default 1e-3) and a plain-descent group ``router`` last (``router_lr``, default
      0.1); weight decay is not part of it (must be None or 0).
    * :class:`PatchCNN` (single-model baseline): Adam with ``lr`` (default 3e-3 for linear,
      1e-2 for cubic filters) and ``weight_decay`` (default 5e-4); no router.
    """
    if isinstance(model, ClusterMoE):
        if weight_decay:
            raise InputError("the MoE's normalised gradient descent has no weight decay")
        expert_lr = EXPERT_LR if lr is None else _non_negative("lr", lr)
        gate_lr = ROUTER_LR if router_lr is None else _non_negative("router_lr", router_lr)
        groups: list[dict[str, Any]] = [
            {"params": list(expert.parameters()), "lr": expert_lr, "name": f"expert{m}"}
            for m, expert in enumerate(model.experts)
        ]
        groups.append(
            {
                "params": list(model.router.parameters()),
                "lr": gate_lr,
                "normalize": False,
                "name": "router",
            }
        )
        return NormalizedGD(groups, lr=expert_lr)
    if isinstance(model, PatchCNN):
        if router_lr is not None:
            raise InputError("a single CNN has no router: router_lr does not apply")
        step = SINGLE_LR[model.activation] if lr is None else _non_negative("lr", lr)
        decay = (
            SINGLE_WEIGHT_DECAY
            if weight_decay is None
            else _non_negative("weight_decay", weight_decay)
        )
        return torch.optim.Adam(model.parameters(), lr=step, weight_decay=decay)
    raise TypeError(f"no cluster optimiser for {type(model).__name__}")


CLUSTER_KINDS = ("cluster_moe", "cluster_single")
"""Model kinds of the cluster family: the paper's MoE and the single-CNN baseline."""

KIND_OPTIONS = {
    "cluster_moe": (
        "experts",
        "filters_per_class",
        "activation",
        "init_scale",
        "top_k",
        "train_noise",
        "test_noise",
        "load_balancing",
        "classes",
        "bias",
    ),
    "cluster_single": ("filters_per_class", "classes", "activation", "init_scale", "bias"),
}
"""Options of each kind (the constructor's arguments but ``dim``, which the data give)."""

SINGLE_INIT_SCALE = 1.0
"""Default init of the single-CNN baselines: PyTorch's, unscaled, as the official code."""


def build_cluster_model(kind: str, options: dict[str, Any] | None, dim: int) -> nn.Module:
    """A cluster-family model from its kind and options; ``dim`` comes from the data.

    ``cluster_moe`` is :class:`ClusterMoE` (defaults: the paper's 8 experts of 16 cubic
    filters, init 1e-3, top-1, noise in training only); ``cluster_single`` is
    :class:`PatchCNN` with ``init_scale`` 1 by default (the official singles keep PyTorch's
    init; the experts' 1e-3 is the MoE's). Unknown options and bad values raise an
    InputError naming the option.
    """
    if kind not in CLUSTER_KINDS:
        raise InputError(
            f"unknown cluster model kind {kind!r}; known kinds: {', '.join(CLUSTER_KINDS)}"
        )
    options = dict(options or {})
    known = KIND_OPTIONS[kind]
    for name in options:
        if name not in known:
            hint = " (the data give it)" if name == "dim" else ""
            raise InputError(
                f"{kind} option {name!r} is not known{hint}; known options: {', '.join(known)}"
            )
    for name in ("bias", "train_noise", "test_noise"):
        if name in options and not isinstance(options[name], bool):
            raise InputError(f"{kind} option {name} must be true or false, got {options[name]!r}")
    if "activation" in options and options["activation"] not in ACTIVATIONS:
        raise InputError(
            f"{kind} option activation: unknown activation {options['activation']!r}; "
            f"valid: {', '.join(ACTIVATIONS)}"
        )
    classes = options.get("classes", 2)
    if isinstance(classes, int) and not isinstance(classes, bool) and classes < 2:
        raise InputError(f"{kind} option classes must be at least 2, got {classes}")
    try:
        if kind == "cluster_moe":
            return ClusterMoE(dim, **options)
        options.setdefault("init_scale", SINGLE_INIT_SCALE)
        return PatchCNN(dim, **options)
    except InputError as exc:
        raise InputError(f"{kind} option {exc}") from None
