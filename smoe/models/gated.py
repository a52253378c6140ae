"""Models of the gated-modular-network family (Krishnamurthy, Watkins, Gaertner, "Improving
Expert Specialization in Mixture of Experts", arXiv 2302.14703), written from the project's
spec of the paper (moe-families.md, part B).

Inputs are images ``x`` of shape [N, C, H, W] (or [N, H, W], read as one channel); labels are
class indices.

* :class:`Expert` is the paper's MNIST expert: Conv(C->1, 3x3)-ReLU-MaxPool2 trunk, then
  FC(flat->5)-ReLU-FC(5->32)-ReLU-FC(32->classes), returning class log-probabilities and its
  32-d last hidden layer h_e (the attentive gate's keys). ``flat`` is computed from the input
  shape (169 for 28x28, 9 for scikit-learn's 8x8 digits), never hard-coded.
* :class:`Gate` has the same trunk and FC(flat->128)-ReLU-FC(128->32)-ReLU-FC(32->E); it
  returns the logits z and its 32-d hidden layer h_g (the attentive gate's query).
* :class:`GatedMoE` combines E experts and a gate; :func:`gated_loss` is the training loss of
  each variant (see :data:`VARIANTS`).
* :func:`importance_loss` and :func:`sample_similarity_loss` are the paper's regularisers.
* :func:`distill_gate` builds a plain-gate model on the frozen experts of a trained one.
* :class:`SingleModel` is the single-network baseline: an expert widened to about the MoE's
  parameter count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from smoe.errors import InputError

VARIANTS = ("expectation", "stochastic", "topk", "em")
"""How the gate combines the experts:

* ``expectation``: out = sum_e p(e|x) y_e(x), loss the NLL of out;
* ``stochastic``: loss -mean log sum_e p(e|x) exp(-0.5 CE(y_e(x), y)); the prediction uses one
  expert, drawn from p(.|x) in training mode and the argmax of p(.|x) in evaluation mode;
* ``topk``: the gate logits outside the top k are set to -inf before the softmax, then as
  ``expectation``;
* ``em``: hard EM. E-step: each sample goes to the expert of largest posterior
  p(e|x) y_e(x)[label] (computed without gradient); M-step: that expert's NLL plus the gate's
  cross-entropy of predicting that expert. Predictions use the gate's argmax expert.
"""

HIDDEN = 32
"""Width of the experts' last and the gate's second hidden layer (the attention dimension)."""
EXPERT_WIDTH = 5
"""Width of the experts' first FC layer in the paper's MNIST architecture."""
GATE_WIDTH = 128
"""Width of the gate's first FC layer in the paper's MNIST architecture."""


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


def _image_shape(in_shape: Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) from ``in_shape`` given as (H, W) or (C, H, W)."""
    shape = tuple(in_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or any(isinstance(v, bool) or not isinstance(v, int) for v in shape):
        raise InputError(f"in_shape must be (H, W) or (C, H, W) integers, got {in_shape!r}")
    if shape[0] < 1 or shape[1] < 3 or shape[2] < 3:
        raise InputError(f"in_shape needs C >= 1 and H, W >= 3 (3x3 conv), got {in_shape!r}")
    return shape  # type: ignore[return-value]


class Trunk(nn.Module):
    """Conv(C->1, 3x3, no padding)-ReLU-MaxPool2-flatten, the paper's shared front end.

    No padding keeps the paper's 28 -> 26 -> 13 (169 features); 8x8 digits give 6 -> 3 (9
    features). Inputs smaller than 4x4 would pool to nothing, so they get padding 1.
    """

    def __init__(self, in_shape: Sequence[int]) -> None:
        super().__init__()
        channels, height, width = _image_shape(in_shape)
        self.in_shape = (channels, height, width)
        padding = 0 if min(height, width) >= 4 else 1
        self.conv = nn.Conv2d(channels, 1, kernel_size=3, padding=padding)
        self.out_features = ((height + 2 * padding - 2) // 2) * ((width + 2 * padding - 2) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"expected x of shape [N, {self.in_shape}], got {list(x.shape)}")
        return F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1)


class Expert(nn.Module):
    """Trunk-FC(flat->width)-ReLU-FC(width->32)-ReLU-FC(32->classes); ``forward`` returns
    (class log-probabilities [N, classes], last hidden h_e [N, 32])."""

    def __init__(
        self, in_shape: Sequence[int], classes: int, width: int = EXPERT_WIDTH, hidden: int = HIDDEN
    ) -> None:
        super().__init__()
        classes = _positive_int("classes", classes)
        width = _positive_int("width", width)
        hidden = _positive_int("hidden", hidden)
        self.trunk = Trunk(in_shape)
        self.fc1 = nn.Linear(self.trunk.out_features, width)
        self.fc2 = nn.Linear(width, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc2(F.relu(self.fc1(self.trunk(x)))))
        return F.log_softmax(self.out(h), dim=-1), h


class ExpertBank(nn.Module):
    """E :class:`Expert` networks evaluated together: one convolution with E output
    channels and batched matrix products instead of a Python loop over experts.

    The arithmetic is that of E separate experts (expert e's conv filter is output channel
    e, its FC layers slice e of each stacked weight), and the parameters start as E freshly
    built :class:`Expert` s would, drawing the same random numbers in the same order. On an
    8x8 digits batch of 64 a training step is about 6x faster than the loop: the step is
    bound by per-operation overhead, which the loop multiplies by E.

    ``forward`` returns (log-probabilities [N, E, classes], last hidden [N, E, 32]);
    :meth:`expert` gives one expert's outputs as :class:`Expert` would.
    """

    def __init__(self, in_shape: Sequence[int], classes: int, experts: int) -> None:
        super().__init__()
        built = [Expert(in_shape, classes) for _ in range(_positive_int("experts", experts))]
        first = built[0]
        self.in_shape = first.trunk.in_shape
        self.padding = first.trunk.conv.padding
        self.out_features = first.trunk.out_features

        def stack(get, transpose: bool = False) -> nn.Parameter:
            parts = [get(e).detach() for e in built]
            if transpose:
                parts = [part.t() for part in parts]
            return nn.Parameter(torch.stack(parts).contiguous())

        self.conv_weight = nn.Parameter(
            torch.cat([e.trunk.conv.weight.detach() for e in built]).contiguous()
        )  # [E, C, 3, 3]
        self.conv_bias = nn.Parameter(torch.cat([e.trunk.conv.bias.detach() for e in built]))
        self.fc1_weight = stack(lambda e: e.fc1.weight, transpose=True)  # [E, F, width]
        self.fc1_bias = stack(lambda e: e.fc1.bias.unsqueeze(0))  # [E, 1, width]
        self.fc2_weight = stack(lambda e: e.fc2.weight, transpose=True)
        self.fc2_bias = stack(lambda e: e.fc2.bias.unsqueeze(0))
        self.out_weight = stack(lambda e: e.out.weight, transpose=True)
        self.out_bias = stack(lambda e: e.out.bias.unsqueeze(0))

    def __len__(self) -> int:
        return self.conv_weight.shape[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"expected x of shape [N, {self.in_shape}], got {list(x.shape)}")
        h = F.conv2d(x, self.conv_weight, self.conv_bias, padding=self.padding)
        h = F.max_pool2d(F.relu(h), 2).flatten(2).transpose(0, 1)  # [E, N, F]
        h = F.relu(torch.baddbmm(self.fc1_bias, h, self.fc1_weight))
        h = F.relu(torch.baddbmm(self.fc2_bias, h, self.fc2_weight))
        logits = torch.baddbmm(self.out_bias, h, self.out_weight)
        return F.log_softmax(logits, dim=-1).transpose(0, 1), h.transpose(0, 1)

    def expert(self, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``e`` alone, computed as a separate :class:`Expert` computes it."""
        if x.dim() == 3:
            x = x.unsqueeze(1)
        h = F.conv2d(
            x, self.conv_weight[e : e + 1], self.conv_bias[e : e + 1], padding=self.padding
        )
        h = F.max_pool2d(F.relu(h), 2).flatten(1)
        h = F.relu(h @ self.fc1_weight[e] + self.fc1_bias[e])
        h = F.relu(h @ self.fc2_weight[e] + self.fc2_bias[e])
        return F.log_softmax(h @ self.out_weight[e] + self.out_bias[e], dim=-1), h


class Gate(nn.Module):
    """Trunk-FC(flat->128)-ReLU-FC(128->32)-ReLU-FC(32->experts); ``forward`` returns
    (logits z [N, experts], hidden h_g [N, 32])."""

    def __init__(
        self, in_shape: Sequence[int], experts: int, width: int = GATE_WIDTH, hidden: int = HIDDEN
    ) -> None:
        super().__init__()
        experts = _positive_int("experts", experts)
        self.trunk = Trunk(in_shape)
        self.fc1 = nn.Linear(self.trunk.out_features, _positive_int("width", width))
        self.fc2 = nn.Linear(width, _positive_int("hidden", hidden))
        self.out = nn.Linear(hidden, experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc2(F.relu(self.fc1(self.trunk(x)))))
        return self.out(h), h


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    return variant


def topk_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``logits`` with every entry outside each row's top ``k`` set to -inf (ties broken by
    ``torch.topk``, so exactly k entries per row stay finite)."""
    index = logits.topk(k, dim=-1).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, index, True)
    return logits.masked_fill(~keep, float("-inf"))


class GatedMoE(nn.Module):
    """E experts and a gate; p(e|x) = softmax(z / temperature).

    With ``attentive=True`` the gate's logits are the attention scores
    z_e = (W_q h_g)^T (W_k h_e) / sqrt(32) instead of its last layer (W_q, W_k 32x32, no bias).
    The gate's own last layer is then unused (kept, so every model has the same gate).
    ``top_k`` is used by the ``topk`` variant only.

    ``forward`` returns a dict:
    ``expert_log_probs`` [N, E, C], ``logits`` z [N, E] (after the top-k mask), ``log_p`` and
    ``p`` [N, E] (the gate's distribution), ``choice`` [N] (the expert each sample is reported as
    routed to: the argmax of p, or a draw from p for ``stochastic`` in training mode),
    ``log_probs`` [N, C] (the model's prediction: the mixture for expectation / top-k, the
    chosen expert's output for stochastic / em) and ``variant``.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        classes: int,
        experts: int = 10,
        variant: str = "expectation",
        top_k: int = 1,
        attentive: bool = False,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.classes = _positive_int("classes", classes)
        self.n_experts = _positive_int("experts", experts)
        self.variant = check_variant(variant)
        self.top_k = _positive_int("top_k", top_k)
        if self.top_k > self.n_experts:
            raise InputError(f"top_k ({top_k}) must not exceed experts ({experts})")
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not temperature > 0
        ):
            raise InputError(f"temperature must be a number > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.attentive = bool(attentive)
        self.in_shape = tuple(in_shape)
        self.experts = ExpertBank(in_shape, classes, experts)
        self.gate = Gate(in_shape, experts)
        if self.attentive:
            self.query = nn.Linear(HIDDEN, HIDDEN, bias=False)
            self.key = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.generator: torch.Generator | None = None
        """Draws of the stochastic variant's routing; PyTorch's global generator when None."""

    def gate_logits(
        self, gate_hidden: torch.Tensor, gate_z: torch.Tensor, expert_hidden: torch.Tensor
    ) -> torch.Tensor:
        """z [N, E]: the gate's own logits, or the attention scores when attentive."""
        if not self.attentive:
            return gate_z
        q = self.query(gate_hidden)  # [N, 32]
        k = self.key(expert_hidden)  # [N, E, 32]
        return torch.einsum("nd,ned->ne", q, k) / math.sqrt(HIDDEN)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        expert_log_probs, expert_hidden = self.experts(x)
        gate_z, gate_hidden = self.gate(x)
        logits = self.gate_logits(gate_hidden, gate_z, expert_hidden)
        if self.variant == "topk":
            logits = topk_mask(logits, self.top_k)
        log_p = F.log_softmax(logits / self.temperature, dim=-1)
        p = log_p.exp()
        if self.variant == "stochastic" and self.training:
            choice = torch.multinomial(p.detach(), 1, generator=self.generator).squeeze(1)
        else:
            choice = p.detach().argmax(dim=-1)
        if self.variant in ("expectation", "topk"):
            log_probs = torch.logsumexp(log_p.unsqueeze(-1) + expert_log_probs, dim=1)
        else:
            log_probs = expert_log_probs[torch.arange(x.shape[0]), choice]
        return {
            "expert_log_probs": expert_log_probs,
            "logits": logits,
            "log_p": log_p,
            "p": p,
            "choice": choice,
            "log_probs": log_probs,
            "variant": self.variant,
        }


def gated_loss(model_output: dict[str, Any], labels: torch.Tensor, variant: str) -> torch.Tensor:
    """Mean training loss of ``variant`` (see :data:`VARIANTS`) from :meth:`GatedMoE.forward`'s
    output and integer ``labels`` [N]."""
    check_variant(variant)
    log_p = model_output["log_p"]
    expert_log_probs = model_output["expert_log_probs"]
    n_experts = expert_log_probs.shape[1]
    index = labels.long().view(-1, 1, 1).expand(-1, n_experts, 1)
    label_log_probs = expert_log_probs.gather(2, index).squeeze(2)  # [N, E] = -CE_e
    if variant in ("expectation", "topk"):
        # log sum_e p_e y_e[label]; -inf logits of top-k give p_e = 0 and drop out.
        return -torch.logsumexp(log_p + label_log_probs, dim=1).mean()
    if variant == "stochastic":
        return -torch.logsumexp(log_p + 0.5 * label_log_probs, dim=1).mean()
    with torch.no_grad():
        target = (log_p + label_log_probs).argmax(dim=1)
    rows = torch.arange(labels.shape[0])
    expert_nll = -label_log_probs[rows, target].mean()
    gate_nll = F.nll_loss(log_p, target)
    return expert_nll + gate_nll


def importance_loss(p: torch.Tensor, w: float) -> torch.Tensor:
    """w * CV(I)^2 with I_e = sum over the batch of p(e|x), CV = std / mean.

    The std is the unbiased one (divisor E - 1), as in Shazeer et al.'s ``cv_squared`` the
    paper's importance loss comes from; one expert has no spread and gives 0.
    """
    importance = p.sum(dim=0)
    if importance.numel() < 2:
        return importance.sum() * 0.0
    return w * importance.var() / importance.mean().pow(2)


def sample_similarity_loss(
    p: torch.Tensor,
    x: torch.Tensor,
    beta_s: float,
    beta_d: float,
    distances: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample-similarity regulariser: pull similar samples onto the same expert, push
    dissimilar ones apart.

    S_e,e' = sum_ij p_e(x_i) p_e'(x_j) D_ij;
    L = (beta_s * sum_e S_e,e / E - beta_d * sum_{e != e'} S_e,e' / (E^2 - E)) / (N (N - 1)),
    N (N - 1) being the number of ordered pairs i != j (D_ii = 0, so i = j adds nothing).
    D_ij = ||x_i - x_j|| / max over the batch, or ``distances`` [N, N] as given (e.g. a
    pretrained feature extractor's, already scaled). One expert drops the beta_d term; one
    sample gives 0.
    """
    n, n_experts = p.shape
    if distances is None:
        flat = x.reshape(n, -1).to(p.dtype)
        distances = torch.cdist(flat, flat)
        top = distances.max()
        if top > 0:
            distances = distances / top
    elif distances.shape != (n, n):
        raise ValueError(f"distances must be [{n}, {n}], got {list(distances.shape)}")
    if n < 2:
        return p.sum() * 0.0
    pair_sums = p.t() @ distances.to(p.dtype) @ p  # [E, E]: S_e,e'
    same = pair_sums.diagonal().sum()
    loss = beta_s * same / n_experts
    if n_experts > 1:
        loss = loss - beta_d * (pair_sums.sum() - same) / (n_experts**2 - n_experts)
    return loss / (n * (n - 1))


def freeze_experts(model: GatedMoE) -> list[nn.Parameter]:
    """Set ``requires_grad=False`` on every expert parameter; returns the parameters still
    trainable (the gate's and, if attentive, W_q / W_k) for the optimiser."""
    for param in model.experts.parameters():
        param.requires_grad_(False)
    return [param for param in model.parameters() if param.requires_grad]


def distill_gate(
    teacher: GatedMoE, variant: str | None = None, top_k: int | None = None
) -> GatedMoE:
    """A plain-gate (non-attentive) model on a copy of ``teacher``'s experts, frozen.

    The paper's distilled model: experts of a trained (typically attentive) model stay as they
    are and only the new gate learns, so the experts' specialisation is kept while the gate
    no longer needs the experts' hidden layers. Train the returned model's
    :func:`trainable_parameters` with the usual :func:`gated_loss`.
    """
    student = GatedMoE(
        teacher.in_shape,
        teacher.classes,
        experts=teacher.n_experts,
        variant=teacher.variant if variant is None else variant,
        top_k=teacher.top_k if top_k is None else top_k,
        attentive=False,
        temperature=teacher.temperature,
    )
    student.experts.load_state_dict(teacher.experts.state_dict())
    freeze_experts(student)
    return student


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [param for param in model.parameters() if param.requires_grad]


def parameter_count(model: nn.Module) -> int:
    """Number of scalar parameters of ``model`` (trainable or not)."""
    return sum(param.numel() for param in model.parameters())


def moe_parameter_count(
    in_shape: Sequence[int], classes: int, experts: int = 10, attentive: bool = False
) -> int:
    """Parameter count of a :class:`GatedMoE` of these sizes, without building it twice."""
    return parameter_count(GatedMoE(in_shape, classes, experts=experts, attentive=attentive))


class SingleModel(nn.Module):
    """The single-network baseline: an :class:`Expert` whose first FC layer is widened so its
    parameter count is the closest to ``params_budget`` (typically the MoE's, from
    :func:`moe_parameter_count`); ``forward`` returns class log-probabilities [N, classes].
    ``width`` records the chosen width."""

    def __init__(self, in_shape: Sequence[int], classes: int, params_budget: int) -> None:
        super().__init__()
        budget = _positive_int("params_budget", params_budget)
        trunk = Trunk(in_shape)
        classes = _positive_int("classes", classes)
        fixed = parameter_count(trunk) + HIDDEN + HIDDEN * classes + classes
        per_width = trunk.out_features + 1 + HIDDEN  # fc1 weights+bias, fc2 weights
        self.width = max(1, round((budget - fixed) / per_width))
        self.net = Expert(in_shape, classes, width=self.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]
