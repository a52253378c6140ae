"""Models of the gated-modular-network family (Krishnamurthy, Watkins, Gaertner, "Improving
Expert Specialization in Mixture of Experts", arXiv 2302.14703), built as the authors'
released code builds them (the project's spec, moe-families.md part B, "Official code").

Inputs are images ``x`` of shape [N, C, H, W] (or [N, H, W], read as one channel); labels are
class indices. Experts output class *probabilities* (a softmax), and every loss is the
official code's cross-entropy on probabilities, CE(o, t) = -log(o[t] + 1e-15), batch mean.

Two architectures (:data:`ARCHITECTURES`), chosen by the data set:

* ``mnist``: expert Conv(C->1, 3x3, no padding)-ReLU-MaxPool2 (28 x 28 -> 169 features)
  -FC(169->5)-ReLU-FC(5->32)-ReLU (h_e)-FC(32->10)-softmax; gate: the same trunk
  -FC(169->128)-ReLU-FC(128->32)-ReLU-FC(32->E); attentive-gate trunk: the same trunk
  -FC(169->128)-ReLU-FC(128->32), no activation, no output layer. The feature count follows
  the input (9 for scikit-learn's 8 x 8 digits), never hard-coded.
* ``cifar10``: expert: four 3x3 convolutions (padding 1) of 4, 8, 16, 16 filters, each
  followed by ReLU and MaxPool2, batch norm after the 2nd and 4th (those without bias)
  -> 64 features -FC(64->64)-ReLU-FC(64->32)-ReLU (h_e)-FC(32->10)-softmax; gate: 64, 128,
  256, 256 filters -> 1024 -FC(1024->512)-ReLU-FC(512->32)-ReLU-FC(32->E); attentive trunk:
  the gate's convolutions, FC(1024->512)-ReLU-FC(512->32).

Routing variants (:data:`VARIANTS`; y_e = expert e's probabilities, z the gate's scores /T):

* ``expectation``: p = softmax(z), o = softmax(sum_e p_e y_e) (a softmax on the mixture);
* ``stochastic``: p = softmax(z); loss -log(sum_e p_e exp(-0.5 CE(y_e, t)) + 1e-15); the
  output is a drawn expert's y in training, the argmax expert's in evaluation;
* ``topk`` with k = 1: p = softmax over all E scores, e* = argmax p, o = softmax(p_e* y_e*):
  the gate learns through p_e*;
* ``topk`` with k > 1: scores outside the top k set to -inf, p = softmax (renormalised over
  the top k), o = sum over the top k of p_e y_e (no extra softmax);
* ``em``: hard EM (not in the published code; kept as an extra model): each sample goes to
  the expert of largest posterior p_e y_e[t] (without gradient), loss that expert's CE plus
  the gate's CE of choosing it; predictions use the argmax expert.

The attentive gate scores experts by attention, q.k_e / sqrt(32) with q = W_q h_gate(x),
k_e = W_k h_e(x) (h_e not detached, so attention trains the experts too).
:func:`importance_loss` and :func:`sample_similarity_loss` are the published regularisers,
normalised as the code normalises them; :func:`distill_gate` builds the distilled model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from smoe.core import compiled
from smoe.core.errors import InputError
from smoe.core.metrics import parameter_count as core_parameter_count

VARIANTS = ("expectation", "stochastic", "topk", "em")
"""How the gate combines the experts (see the module docstring)."""

ARCHITECTURES = ("mnist", "cifar10")
"""The published networks: the MNIST one (used for every grey data set) and CIFAR-10's."""

EPS = 1e-15
"""The official code's guard inside every log: CE(o, t) = -log(o[t] + 1e-15)."""

HIDDEN = 32
"""Width of the experts' last and the gates' second hidden layer (the attention dimension)."""

ARCH: dict[str, dict[str, Any]] = {
    "mnist": {
        "expert_filters": (1,),
        "gate_filters": (1,),
        "batchnorm": (),
        "padding": 0,
        "expert_width": 5,
        "gate_width": 128,
    },
    "cifar10": {
        "expert_filters": (4, 8, 16, 16),
        "gate_filters": (64, 128, 256, 256),
        "batchnorm": (1, 3),
        "padding": 1,
        "expert_width": 64,
        "gate_width": 512,
    },
}
"""Sizes of each architecture: conv filters per layer, the layers followed by batch norm
(0-based; those convolutions have no bias), the convolution padding, and the width of the
first fully connected layer of an expert and of a gate."""


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


def image_shape(in_shape: Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) from ``in_shape`` given as (H, W) or (C, H, W)."""
    shape = tuple(in_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or any(isinstance(v, bool) or not isinstance(v, int) for v in shape):
        raise InputError(f"in_shape must be (H, W) or (C, H, W) integers, got {in_shape!r}")
    if shape[0] < 1 or shape[1] < 3 or shape[2] < 3:
        raise InputError(f"in_shape needs C >= 1 and H, W >= 3 (3x3 conv), got {in_shape!r}")
    return shape  # type: ignore[return-value]


def check_architecture(architecture: str) -> str:
    if architecture not in ARCHITECTURES:
        raise InputError(
            f"unknown architecture {architecture!r}; valid: {', '.join(ARCHITECTURES)}"
        )
    return architecture


def architecture_of(dataset: str) -> str:
    """The published network of a data set: CIFAR-10's for cifar10, MNIST's otherwise."""
    return "cifar10" if dataset == "cifar10" else "mnist"


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    return variant


def _conv_pool_forward(
    maps: np.ndarray, bias: np.ndarray, out: np.ndarray, code: np.ndarray
) -> None:
    """2 x 2 max pooling of maps [K, N, 2R, 2C] plus the filter's bias into out [K * N, R, C];
    code says which of each window's four values (0..3, row-major; the first of equals, as
    ``max_pool2d``) won. Adding the bias after the pooling is exact: it shifts a window's
    four values alike."""
    filters, images = maps.shape[0], maps.shape[1]
    maps = maps.reshape(filters * images, maps.shape[2], maps.shape[3])
    m, rows, cols = out.shape
    for k in range(m):
        shift = bias[k // images]
        for i in range(rows):
            for j in range(cols):
                best = maps[k, 2 * i, 2 * j]
                pick = 0
                for index in range(1, 4):
                    value = maps[k, 2 * i + index // 2, 2 * j + index % 2]
                    if value > best:
                        best = value
                        pick = index
                out[k, i, j] = best + shift
                code[k, i, j] = pick


def _conv_pool_backward(
    grad: np.ndarray,
    code: np.ndarray,
    x: np.ndarray,
    weight_grad: np.ndarray,
    bias_grad: np.ndarray,
) -> None:
    """The filters' gradients of a 3x3 convolution followed by 2 x 2 max pooling, from the
    pooled gradient grad [K, N, R, C] alone: each window's gradient reaches only its
    winning position (``code``), so weight_grad[k, c*9 + a*3 + b] sums grad times
    x[n, c, 2p + dp + a, 2q + dq + b] over the windows (p, q) with a gradient (float64
    sums, more exact than the float32 ones of a matrix product), bias_grad[k] the grads."""
    filters, images, rows, cols = grad.shape
    channels = x.shape[1]
    for k in range(filters):
        sums = np.zeros(9 * channels)
        total = 0.0
        for n in range(images):
            for p in range(rows):
                for q in range(cols):
                    value = grad[k, n, p, q]
                    if value == 0.0:
                        continue
                    pick = code[k * images + n, p, q]
                    top = 2 * p + pick // 2
                    left = 2 * q + pick % 2
                    total += value
                    for c in range(channels):
                        for a in range(3):
                            for b in range(3):
                                sums[c * 9 + a * 3 + b] += value * x[n, c, top + a, left + b]
        for t in range(9 * channels):
            weight_grad[k, t] = sums[t]
        bias_grad[k] = total


_conv_pool_forward_compiled = compiled.compiled(_conv_pool_forward)
_conv_pool_backward_compiled = compiled.compiled(_conv_pool_backward)


def _patches(x: torch.Tensor) -> torch.Tensor:
    """The 3 x 3 patches of x [N, C, H, W] (no padding) as [9C, N * (H-2) * (W-2)]."""
    n, channels, height, width = x.shape
    rows, cols = height - 2, width - 2
    parts = [
        x[:, c, i : i + rows, j : j + cols]
        for c in range(channels)
        for i in range(3)
        for j in range(3)
    ]
    return torch.stack(parts).reshape(9 * channels, n * rows * cols)


class _ConvPool(torch.autograd.Function):
    """MaxPool2(Conv3x3(x)) on the CPU for inputs that need no gradient (images): the
    convolution as one matrix product with the patches, the pooling and the filters'
    backward as compiled loops (:func:`_conv_pool_forward`, :func:`_conv_pool_backward`).

    The same values and gradients as ``max_pool2d(conv2d(x, w, b), 2)`` up to float
    rounding, about three times faster for the MNIST trunk: oneDNN's convolution of one
    input channel and ``max_pool2d`` cross these [N * E, 26, 26] maps at several nanoseconds
    a value, and the filters' gradient needs only the pooled winners, a quarter of them.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        filters = weight.shape[0]
        n, channels, height, width = x.shape
        rows, cols = height - 2, width - 2
        maps = weight.reshape(filters, 9 * channels) @ _patches(x)
        out = np.empty((filters * n, rows // 2, cols // 2), dtype=np.float32)
        code = np.empty(out.shape, dtype=np.uint8)
        _conv_pool_forward_compiled(
            maps.numpy().reshape(filters, n, rows, cols), bias.detach().numpy(), out, code
        )
        ctx.code, ctx.x = code, x.detach().contiguous().numpy()
        ctx.weight_shape = weight.shape
        return torch.from_numpy(out).view(filters, n, rows // 2, cols // 2)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        filters = ctx.weight_shape[0]
        weight_grad = np.empty((filters, int(np.prod(ctx.weight_shape[1:]))), dtype=np.float32)
        bias_grad = np.empty(filters, dtype=np.float32)
        source = grad.detach().contiguous().numpy()
        _conv_pool_backward_compiled(source, ctx.code, ctx.x, weight_grad, bias_grad)
        return (
            None,
            torch.from_numpy(weight_grad).view(ctx.weight_shape),
            torch.from_numpy(bias_grad),
        )


def conv_pool_relu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """ReLU(MaxPool2(Conv3x3(x))) of the MNIST trunk, no padding, as [K, N, features]: the
    K filters' pooled maps of every image, the layout the experts' batched FC layers read.

    On the CPU with numba, for float32 images that need no gradient: :class:`_ConvPool`.
    Otherwise the convolution is one matrix product with the patches and the pooling
    ``max_pool2d``. The ReLU comes after the pooling, where it touches a quarter of the
    values (the two commute: max(relu(a)) = relu(max(a))). Needs even convolution outputs
    (28 x 28 -> 26 x 26); :class:`ConvTrunk` takes the plain path otherwise.
    """
    n, channels, height, width = x.shape
    rows, cols = height - 2, width - 2
    filters = weight.shape[0]
    fast = (
        x.device.type == "cpu"
        and compiled.available()
        and x.dtype == weight.dtype == torch.float32
        and bias is not None
        and not x.requires_grad
    )
    if fast:
        pooled = _ConvPool.apply(x, weight, bias)
    else:
        flat = weight.reshape(filters, 9 * channels)
        patches = _patches(x)
        maps = flat @ patches if bias is None else torch.addmm(bias.view(-1, 1), flat, patches)
        pooled = F.max_pool2d(maps.view(filters * n, 1, rows, cols), 2)
    return F.relu(pooled).reshape(filters, n, (rows // 2) * (cols // 2))


def fast_trunk(shape: Sequence[int], padding: int, layers: int) -> bool:
    """Whether :func:`conv_pool_relu` computes a trunk of this input ``shape`` (C, H, W):
    one unpadded convolution with even outputs."""
    return layers == 1 and padding == 0 and shape[1] % 2 == 0 and shape[2] % 2 == 0


class ConvTrunk(nn.Module):
    """3x3 convolutions, each followed by (batch norm,) ReLU and MaxPool2, then flattened.

    The MNIST trunk is one convolution without padding (28 -> 26 -> 13: 169 features); inputs
    under 4 x 4 would pool to nothing, so they get padding 1. ``out_features`` is the
    flattened size for the input shape given.
    """

    def __init__(self, in_shape: Sequence[int], architecture: str, filters: Sequence[int]):
        super().__init__()
        channels, height, width = image_shape(in_shape)
        spec = ARCH[check_architecture(architecture)]
        self.in_shape = (channels, height, width)
        padding = spec["padding"] if min(height, width) >= 4 else 1
        self.padding = padding
        self.batchnorm = tuple(spec["batchnorm"])
        convs, norms = [], {}
        size = (height, width)
        for layer, out in enumerate(filters):
            norm = layer in self.batchnorm
            convs.append(nn.Conv2d(channels, out, 3, padding=padding, bias=not norm))
            if norm:
                norms[str(layer)] = nn.BatchNorm2d(out)
            channels = out
            size = tuple((n + 2 * padding - 2) // 2 for n in size)
            if min(size) < 1:
                raise InputError(
                    f"images of {self.in_shape[1]} x {self.in_shape[2]} are too small for the "
                    f"{architecture} network ({len(filters)} conv-pool layers)"
                )
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleDict(norms)
        self.out_features = channels * size[0] * size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"expected x of shape [N, {self.in_shape}], got {list(x.shape)}")
        if fast_trunk(self.in_shape, self.padding, len(self.convs)):
            conv = self.convs[0]
            return conv_pool_relu(x, conv.weight, conv.bias).transpose(0, 1).flatten(1)
        for layer, conv in enumerate(self.convs):
            x = conv(x)
            if str(layer) in self.norms:
                x = self.norms[str(layer)](x)
            x = F.max_pool2d(F.relu(x), 2)
        return x.flatten(1)


class Expert(nn.Module):
    """One expert: trunk-FC(F->width)-ReLU-FC(width->32)-ReLU-FC(32->classes)-softmax;
    ``forward`` returns (class probabilities [N, classes], last hidden h_e [N, 32]).

    ``width`` defaults to the architecture's (MNIST 5, CIFAR-10 64); the mixture-sized single
    model widens it."""

    def __init__(
        self,
        in_shape: Sequence[int],
        classes: int,
        architecture: str = "mnist",
        width: int | None = None,
    ) -> None:
        super().__init__()
        spec = ARCH[check_architecture(architecture)]
        self.architecture = architecture
        self.classes = _positive_int("classes", classes)
        self.width = _positive_int("width", spec["expert_width"] if width is None else width)
        self.trunk = ConvTrunk(in_shape, architecture, spec["expert_filters"])
        self.fc1 = nn.Linear(self.trunk.out_features, self.width)
        self.fc2 = nn.Linear(self.width, HIDDEN)
        self.out = nn.Linear(HIDDEN, self.classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc2(F.relu(self.fc1(self.trunk(x)))))
        return torch.softmax(self.out(h), dim=-1), h


class ExpertBank(nn.Module):
    """E :class:`Expert` networks evaluated together: grouped convolutions (the first sees
    the shared input with E times the filters; each later one is grouped by expert), batch
    norm over the E experts' channels side by side, and batched matrix products.

    The arithmetic is that of E separate experts: expert e's filters are its block of output
    channels, its batch-norm statistics those of its channels, its FC layers slice e of each
    stacked weight; the parameters start as E freshly built :class:`Expert` s would (the same
    random numbers in the same order). On MNIST a training step is several times faster than
    a loop over experts: the step is bound by per-operation overhead, which the loop
    multiplies by E. :meth:`expert_state` gives expert e as a separate :class:`Expert`'s
    state, the reference the tests compare with.

    ``forward`` returns (probabilities [N, E, classes], last hidden [N, E, 32]).
    """

    def __init__(
        self, in_shape: Sequence[int], classes: int, experts: int, architecture: str = "mnist"
    ) -> None:
        super().__init__()
        count = _positive_int("experts", experts)
        built = [Expert(in_shape, classes, architecture) for _ in range(count)]
        first = built[0]
        self.architecture = architecture
        self.in_shape = first.trunk.in_shape
        self.padding = first.trunk.padding
        self.batchnorm = first.trunk.batchnorm
        self.out_features = first.trunk.out_features
        self.filters = [conv.out_channels for conv in first.trunk.convs]
        self.count = count

        def cat(tensors) -> nn.Parameter:
            return nn.Parameter(torch.cat([t.detach() for t in tensors]).contiguous())

        def stack(tensors, transpose: bool = False) -> nn.Parameter:
            parts = [t.detach().t() if transpose else t.detach() for t in tensors]
            return nn.Parameter(torch.stack(parts).contiguous())

        self.conv_weight = nn.ParameterList(
            cat(e.trunk.convs[layer].weight for e in built) for layer in range(len(self.filters))
        )
        self.conv_bias = nn.ParameterDict(
            {
                str(layer): cat(e.trunk.convs[layer].bias for e in built)
                for layer in range(len(self.filters))
                if layer not in self.batchnorm
            }
        )
        self.norms = nn.ModuleDict()
        for layer in self.batchnorm:
            norm = nn.BatchNorm2d(count * self.filters[layer])
            with torch.no_grad():
                norm.weight.copy_(torch.cat([e.trunk.norms[str(layer)].weight for e in built]))
                norm.bias.copy_(torch.cat([e.trunk.norms[str(layer)].bias for e in built]))
            self.norms[str(layer)] = norm
        self.fc1_weight = stack((e.fc1.weight for e in built), transpose=True)  # [E, F, w]
        self.fc1_bias = stack(e.fc1.bias.unsqueeze(0) for e in built)  # [E, 1, w]
        self.fc2_weight = stack((e.fc2.weight for e in built), transpose=True)
        self.fc2_bias = stack(e.fc2.bias.unsqueeze(0) for e in built)
        self.out_weight = stack((e.out.weight for e in built), transpose=True)
        self.out_bias = stack(e.out.bias.unsqueeze(0) for e in built)

    def __len__(self) -> int:
        return self.count

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"expected x of shape [N, {self.in_shape}], got {list(x.shape)}")
        if fast_trunk(self.in_shape, self.padding, len(self.filters)):
            h = conv_pool_relu(x, self.conv_weight[0], self.conv_bias["0"])  # [E, N, F]
        else:
            h = x
            for layer, weight in enumerate(self.conv_weight):
                bias = self.conv_bias[str(layer)] if str(layer) in self.conv_bias else None
                groups = 1 if layer == 0 else self.count
                h = F.conv2d(h, weight, bias, padding=self.padding, groups=groups)
                if str(layer) in self.norms:
                    h = self.norms[str(layer)](h)
                h = F.max_pool2d(F.relu(h), 2)
            n = h.shape[0]
            h = h.reshape(n, self.count, self.out_features).transpose(0, 1)  # [E, N, F]
        h = F.relu(torch.baddbmm(self.fc1_bias, h, self.fc1_weight))
        h = F.relu(torch.baddbmm(self.fc2_bias, h, self.fc2_weight))
        logits = torch.baddbmm(self.out_bias, h, self.out_weight)
        return torch.softmax(logits, dim=-1).transpose(0, 1), h.transpose(0, 1)

    def expert_state(self, e: int) -> dict[str, torch.Tensor]:
        """Expert ``e`` as the ``state_dict`` of a separate :class:`Expert`."""
        state: dict[str, torch.Tensor] = {}
        for layer, weight in enumerate(self.conv_weight):
            width = self.filters[layer]
            rows = slice(e * width, (e + 1) * width)
            state[f"trunk.convs.{layer}.weight"] = weight[rows].detach().clone()
            if str(layer) in self.conv_bias:
                state[f"trunk.convs.{layer}.bias"] = self.conv_bias[str(layer)][rows].detach()
            if str(layer) in self.norms:
                norm = self.norms[str(layer)]
                for key in ("weight", "bias", "running_mean", "running_var"):
                    state[f"trunk.norms.{layer}.{key}"] = getattr(norm, key)[rows].detach()
                state[f"trunk.norms.{layer}.num_batches_tracked"] = norm.num_batches_tracked
        for name in ("fc1", "fc2", "out"):
            state[f"{name}.weight"] = getattr(self, f"{name}_weight")[e].t().detach()
            state[f"{name}.bias"] = getattr(self, f"{name}_bias")[e, 0].detach()
        return {key: value.clone() for key, value in state.items()}


class Gate(nn.Module):
    """The plain gate: trunk-FC(F->width)-ReLU-FC(width->32)-ReLU-FC(32->E); ``forward``
    returns the logits z [N, E]."""

    def __init__(self, in_shape: Sequence[int], experts: int, architecture: str = "mnist"):
        super().__init__()
        spec = ARCH[check_architecture(architecture)]
        self.trunk = ConvTrunk(in_shape, architecture, spec["gate_filters"])
        self.fc1 = nn.Linear(self.trunk.out_features, spec["gate_width"])
        self.fc2 = nn.Linear(spec["gate_width"], HIDDEN)
        self.out = nn.Linear(HIDDEN, _positive_int("experts", experts))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(self.trunk(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x))


class AttentiveTrunk(nn.Module):
    """The attentive gate's query network: trunk-FC(F->width)-ReLU-FC(width->32), no
    activation after the last layer and no output layer; ``forward`` returns [N, 32]."""

    def __init__(self, in_shape: Sequence[int], architecture: str = "mnist"):
        super().__init__()
        spec = ARCH[check_architecture(architecture)]
        self.trunk = ConvTrunk(in_shape, architecture, spec["gate_filters"])
        self.fc1 = nn.Linear(self.trunk.out_features, spec["gate_width"])
        self.fc2 = nn.Linear(spec["gate_width"], HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.trunk(x))))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``scores`` with every entry outside each row's top ``k`` set to -inf (ties broken by
    ``torch.topk``, so exactly k entries per row stay finite)."""
    index = scores.topk(k, dim=-1).indices
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, True)
    return scores.masked_fill(~keep, float("-inf"))


def hard_routing(variant: str, top_k: int) -> bool:
    """Whether a model sends each sample to one expert (top-1, stochastic, EM): its H_s is
    0 and its usage is counted from argmax choices (the published metrics' convention)."""
    return variant in ("stochastic", "em") or (variant == "topk" and top_k == 1)


class GatedMoE(nn.Module):
    """E experts and a gate (plain, or attentive with ``attentive=True``); see the module
    docstring for the variants. ``top_k`` is used by the ``topk`` variant only.

    ``forward`` returns a dict: ``expert_probs`` [N, E, C] and ``expert_hidden`` [N, E, 32];
    ``scores`` [N, E] (the gate's logits or attention scores, divided by the temperature);
    ``weights`` [N, E] (the gate output the regularisers and metrics read: the softmax for
    expectation, stochastic, EM and top-1, the renormalised top-k weights for k > 1);
    ``choice`` [N] (the expert a sample is routed to: a draw from the weights for stochastic
    in training mode, their argmax otherwise); ``output`` [N, C] (the model's class
    probabilities) and ``variant``.
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
        architecture: str = "mnist",
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
        self.architecture = check_architecture(architecture)
        self.in_shape = tuple(image_shape(in_shape))
        self.experts = ExpertBank(in_shape, classes, experts, architecture)
        if self.attentive:
            self.gate = AttentiveTrunk(in_shape, architecture)
            self.query = nn.Linear(HIDDEN, HIDDEN, bias=False)
            self.key = nn.Linear(HIDDEN, HIDDEN, bias=False)
        else:
            self.gate = Gate(in_shape, experts, architecture)
        self.generator: torch.Generator | None = None
        """Draws of the stochastic variant's training routes: a generator on the inputs'
        device (the trainer's ``routes`` stream); PyTorch's default generator when None."""

    @property
    def hard(self) -> bool:
        return hard_routing(self.variant, self.top_k)

    def gate_scores(self, x: torch.Tensor, expert_hidden: torch.Tensor) -> torch.Tensor:
        """z [N, E] before the temperature: the gate's logits, or the attention scores."""
        if not self.attentive:
            return self.gate(x)
        q = self.query(self.gate(x))  # [N, 32]
        k = self.key(expert_hidden)  # [N, E, 32]
        return torch.einsum("nd,ned->ne", q, k) / math.sqrt(HIDDEN)

    def _draw(self, weights: torch.Tensor) -> torch.Tensor:
        generator = self.generator
        if generator is not None and generator.device.type != weights.device.type:
            raise ValueError(
                f"the routes' generator is on {generator.device}, the gate's weights on "
                f"{weights.device}: a sampling op draws on its tensors' device"
            )
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        expert_probs, expert_hidden = self.experts(x)
        scores = self.gate_scores(x, expert_hidden) / self.temperature
        rows = torch.arange(x.shape[0], device=x.device)
        if self.variant == "topk" and self.top_k > 1:
            weights = torch.softmax(topk_mask(scores, self.top_k), dim=-1)
        else:
            weights = torch.softmax(scores, dim=-1)
        if self.variant == "stochastic" and self.training:
            choice = self._draw(weights.detach())
        else:
            choice = weights.detach().argmax(dim=-1)
        chosen = expert_probs[rows, choice]  # [N, C]
        if self.variant == "expectation":
            output = torch.softmax((weights.unsqueeze(-1) * expert_probs).sum(dim=1), dim=-1)
        elif self.variant == "topk" and self.top_k == 1:
            output = torch.softmax(weights[rows, choice].unsqueeze(-1) * chosen, dim=-1)
        elif self.variant == "topk":
            output = (weights.unsqueeze(-1) * expert_probs).sum(dim=1)
        else:
            output = chosen
        return {
            "expert_probs": expert_probs,
            "expert_hidden": expert_hidden,
            "scores": scores,
            "weights": weights,
            "choice": choice,
            "output": output,
            "variant": self.variant,
        }


def cross_entropy(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The official code's CE on probabilities: mean of -log(probs[t] + 1e-15)."""
    picked = probs.gather(1, labels.long().view(-1, 1)).squeeze(1)
    return -torch.log(picked + EPS).mean()


def gated_loss(model_output: Mapping[str, Any], labels: torch.Tensor) -> torch.Tensor:
    """Mean training loss of the model's variant (see the module docstring) from
    :meth:`GatedMoE.forward`'s output and integer ``labels`` [N]."""
    variant = check_variant(model_output["variant"])
    if variant in ("expectation", "topk"):
        return cross_entropy(model_output["output"], labels)
    probs, weights = model_output["expert_probs"], model_output["weights"]
    index = labels.long().view(-1, 1, 1).expand(-1, probs.shape[1], 1)
    label_probs = probs.gather(2, index).squeeze(2)  # [N, E]: y_e[t]
    expert_ce = -torch.log(label_probs + EPS)  # CE(y_e, t)
    if variant == "stochastic":
        mixture = (weights * torch.exp(-0.5 * expert_ce)).sum(dim=1)
        return -torch.log(mixture + EPS).mean()
    with torch.no_grad():  # EM: the E-step's expert, the largest posterior p_e y_e[t]
        target = (weights * label_probs).argmax(dim=1)
    rows = torch.arange(labels.shape[0], device=labels.device)
    return expert_ce[rows, target].mean() + cross_entropy(weights, target)


def importance_loss(weights: torch.Tensor, w: float) -> torch.Tensor:
    """w * CV(I)^2 with I_e = sum over the batch of the gate weight p_e(x), CV = std / mean,
    the std the unbiased one (divisor E - 1), as the official code; one expert gives 0."""
    importance = weights.sum(dim=0)
    if importance.numel() < 2:
        return importance.sum() * 0.0
    return w * importance.var() / importance.mean().pow(2)


def pixel_distances(x: torch.Tensor) -> torch.Tensor:
    """D_ab = ||x_a - x_b|| of the flattened (normalised) inputs, divided by the batch's
    largest distance (a batch of identical images gives zeros)."""
    flat = x.reshape(x.shape[0], -1)
    distances = torch.cdist(flat, flat)
    top = distances.max()
    return distances / top if top > 0 else distances


def sample_similarity_loss(
    weights: torch.Tensor,
    x: torch.Tensor,
    beta_s: float,
    beta_d: float,
    distances: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sample-similarity regulariser as the official code computes it.

    same = sum_e (1/E) sum_ab p_e(a) p_e(b) D_ab; diff = sum_{e != e'} 1/(E^2 - E) sum_ab
    p_e(a) p_e'(b) D_ab; L_s = beta_s * same - beta_d * diff / B^2 (only the second term is
    divided by B^2, as written in the code). D = :func:`pixel_distances` of ``x``, or
    ``distances`` [B, B] as given (e.g. a trained network's features'). One expert drops the
    beta_d term.
    """
    batch, experts = weights.shape
    if distances is None:
        distances = pixel_distances(x.to(weights.dtype))
    elif distances.shape != (batch, batch):
        raise ValueError(f"distances must be [{batch}, {batch}], got {list(distances.shape)}")
    pair_sums = weights.t() @ distances.to(weights.dtype) @ weights  # [E, E]
    same = pair_sums.diagonal().sum() / experts
    loss = beta_s * same
    if experts > 1:
        diff = (pair_sums.sum() - pair_sums.diagonal().sum()) / (experts**2 - experts)
        loss = loss - beta_d * diff / batch**2
    return loss


def freeze_experts(model: GatedMoE) -> list[nn.Parameter]:
    """Set ``requires_grad=False`` on every expert parameter; returns the parameters still
    trainable (the gate's) for the optimiser."""
    for param in model.experts.parameters():
        param.requires_grad_(False)
    return trainable_parameters(model)


def distill_gate(teacher: GatedMoE) -> GatedMoE:
    """The published distilled model ("train from attention model") of a trained teacher.

    A plain-gate model of the teacher's variant, k, temperature and architecture whose
    experts are copies of the teacher's, frozen, and whose gate copies the teacher's gate
    trunk (the attentive trunk's convolutions and two FC layers, or a plain gate's same
    layers); only the gate's output layer 32->E keeps its fresh initialisation, and W_q, W_k
    are dropped. Train it with plain CE and no regulariser.
    """
    student = GatedMoE(
        teacher.in_shape,
        teacher.classes,
        experts=teacher.n_experts,
        variant=teacher.variant,
        top_k=teacher.top_k,
        attentive=False,
        temperature=teacher.temperature,
        architecture=teacher.architecture,
    )
    student.experts.load_state_dict(teacher.experts.state_dict())
    for part in ("trunk", "fc1", "fc2"):
        getattr(student.gate, part).load_state_dict(getattr(teacher.gate, part).state_dict())
    freeze_experts(student)
    return student


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [param for param in model.parameters() if param.requires_grad]


def parameter_count(model: nn.Module) -> int:
    """Number of scalar parameters of ``model`` (trainable or not)."""
    return core_parameter_count(model, trainable=False)


def moe_parameter_count(
    in_shape: Sequence[int],
    classes: int,
    experts: int = 10,
    attentive: bool = False,
    architecture: str = "mnist",
) -> int:
    """Parameter count of a :class:`GatedMoE` of these sizes."""
    model = GatedMoE(
        in_shape, classes, experts=experts, attentive=attentive, architecture=architecture
    )
    return parameter_count(model)


class SingleModel(nn.Module):
    """The single-model baseline: exactly one :class:`Expert` (the published one), or with
    ``params_budget`` an expert whose first FC layer is widened until its parameter count is
    the closest to the budget (the mixture-sized network, an extra, stronger baseline).
    ``forward`` returns class probabilities [N, classes]; ``width`` records the FC width."""

    def __init__(
        self,
        in_shape: Sequence[int],
        classes: int,
        params_budget: int | None = None,
        architecture: str = "mnist",
    ) -> None:
        super().__init__()
        width = None
        if params_budget is not None:
            budget = _positive_int("params_budget", params_budget)
            base = Expert(in_shape, classes, architecture)
            per_width = base.trunk.out_features + 1 + HIDDEN  # fc1 weights + bias, fc2 weights
            fixed = parameter_count(base) - per_width * base.width
            width = max(1, round((budget - fixed) / per_width))
        self.net = Expert(in_shape, classes, architecture, width=width)
        self.width = self.net.width
        self.mixture_sized = params_budget is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]
