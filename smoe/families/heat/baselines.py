"""Baselines the SMoE paper compares against, each built by name from :data:`BASELINES`.

Every constructor takes ``(in_channels, height, width, **options)`` and returns a module mapping
[B, in_channels, H, W] to the next frame [B, 1, H, W]. Together they bracket SMoE: a model that
ignores location (CNN), models that get location from extra inputs (CoordConv) or from
per-sample rather than per-location experts (CondConv), models with a separate stencil at every
point (LCN, Conv+LCN), one with no locality prior at all (MLP), and the trivial forecast
(persistence) that any learned model has to beat.

By default every baseline is built the way the paper's reference code builds it, so that the
comparison is the paper's: no layer has a bias, CoordConv adds the coordinate channels before
every convolution, Conv+LCN is a bias-free 3x3 convolution to 3 channels followed by a 1x1
locally connected layer (no normalisation or activation between), and the MLP is one bias-free
dense layer. ``init: reference`` (the default) initialises weights as the reference does;
``init: pytorch`` keeps PyTorch's layer defaults. The options reach the other variants
(``bias: true``, ``hidden: [...]``, ``batchnorm``, ``activation``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from smoe.nn.batchnorm import DirectBatchNorm2d
from smoe.nn.conv import DirectConv2d, direct_conv2d
from smoe.nn.layers import AddCoords, LocallyConnected2d, coordinate_channels, make_activation

INITS = ("reference", "pytorch")
"""Weight initialisations: the reference code's (see :func:`reference_init`) or PyTorch's."""

COORDINATE_CHANNELS = 2
"""Channels CoordConv adds to its input: each point's row and column."""

COORDS = ("every", "first")
"""Where CoordConv adds the coordinate channels: before every convolution, or the first only."""


def _widths(in_channels: int, hidden: Sequence[int], out_channels: int = 1) -> list[int]:
    """Channel widths [C, h1, ..., out] of a stack, checking that each is a positive integer."""
    widths = [in_channels, *hidden, out_channels]
    for width in widths:
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"channel widths must be positive integers, got {widths}")
    return widths


def _check_kernel_size(kernel_size: int, name: str = "kernel_size") -> None:
    """Odd kernels only: "same" padding k // 2 then keeps the grid size, as every layer needs."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size % 2 != 1:
        raise ValueError(f"{name} must be a positive odd integer, got {kernel_size!r}")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(choices)}")


def _fan_in(layer: nn.Module) -> int:
    """Inputs feeding one output value of a weight layer (channels x kernel taps)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    if isinstance(layer, nn.Conv2d):
        return layer.weight[0].numel()
    if isinstance(layer, LocallyConnected2d):
        return layer.weight.shape[1]
    if isinstance(layer, CondConv2d):
        return layer.in_channels * layer.kernel_size * layer.kernel_size
    raise TypeError(f"no fan-in rule for {type(layer).__name__}")


def _uniform_(tensor: torch.Tensor, fan_in: int, gain: float) -> None:
    """Kaiming-uniform with the given gain: U(-b, b), b = gain * sqrt(3 / fan_in)."""
    bound = gain * math.sqrt(3.0 / fan_in)
    with torch.no_grad():
        tensor.uniform_(-bound, bound)


def reference_init(layers: Sequence[nn.Module]) -> None:
    """The reference code's "default" initialisation of a network's weight layers, in order.

    Every bias is zero; weights are Kaiming-uniform for ReLU (bound sqrt(6 / fan_in)) except
    in the last layer, which gets gain 1 (bound sqrt(3 / fan_in)), with fan_in = C * k * k for
    convolutions and locally connected layers alike. A CondConv layer's routing layer feeds a
    sigmoid and gets gain 1 too.
    """
    relu_gain = nn.init.calculate_gain("relu")
    for index, layer in enumerate(layers):
        gain = 1.0 if index == len(layers) - 1 else relu_gain
        _uniform_(layer.weight, _fan_in(layer), gain)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
        if isinstance(layer, CondConv2d):
            _uniform_(layer.route.weight, layer.in_channels, 1.0)
            if layer.route.bias is not None:
                nn.init.zeros_(layer.route.bias)


def _initialise(layers: Sequence[nn.Module], init: str) -> None:
    _check_choice("init", init, INITS)
    if init == "reference":
        reference_init(layers)


def _layer_stack(
    widths: list[int],
    layer: Callable[[int, int], nn.Module],
    batchnorm: bool,
    activation: str,
    init: str,
) -> list[nn.Module]:
    """Layer(w0->w1)-[BN]-act-...-Layer(w_{n-1}->w_n), with nothing after the last layer."""
    make_activation(activation)  # reject a bad name even when the stack has no hidden layer
    _check_choice("init", init, INITS)
    modules: list[nn.Module] = []
    layers: list[nn.Module] = []
    for index, (cin, cout) in enumerate(pairwise(widths)):
        layers.append(layer(cin, cout))
        modules.append(layers[-1])
        if index < len(widths) - 2:
            if batchnorm:
                modules.append(DirectBatchNorm2d(cout))
            modules.append(make_activation(activation))
    _initialise(layers, init)
    return modules


class Persistence(nn.Module):
    """Predict that nothing changes: u_{t+1} = u_t.

    Diffusion changes a frame little per step, so this is the floor every learned model must
    clear; it has no parameters, and the trainer skips optimisation for it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1]


class ConvNet(nn.Sequential):
    """Plain CNN: one set of stencils shared by every location.

    Translation invariance is exactly what a location-dependent diffusivity breaks, so this is
    the model SMoE has to improve on without giving up weight sharing. Default: the reference's
    Conv(C->4)-BN-ReLU-Conv(4->1), 3x3, no biases (80 parameters for one input channel).
    """

    def __init__(
        self,
        in_channels: int,
        height: int,
        width: int,
        *,
        hidden: Sequence[int] = (4,),
        kernel_size: int = 3,
        batchnorm: bool = True,
        activation: str = "relu",
        bias: bool = False,
        init: str = "reference",
    ) -> None:
        _check_kernel_size(kernel_size)

        def conv(cin: int, cout: int) -> nn.Module:
            return DirectConv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=bias)

        widths = _widths(in_channels, hidden)
        super().__init__(*_layer_stack(widths, conv, batchnorm, activation, init))


class CoordConv2d(DirectConv2d):
    """A "same" convolution that also sees each point's (row, column), both in [-1, 1].

    Built for ``in_channels`` input channels; its weight has two more (the coordinates), which
    ``self.in_channels`` counts.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = False
    ) -> None:
        super().__init__(
            in_channels + COORDINATE_CHANNELS,
            out_channels,
            kernel_size,
            padding=kernel_size // 2,
            bias=bias,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast_path(x):
            return super().forward(torch.cat([x, coordinate_channels(x)], dim=1))
        # The coordinate channels are the same in every image: their share of the sums is
        # one image's convolution, broadcast over the batch (and their weights' gradient one
        # image's, of the batch's summed output gradient), a third of the work for one input
        # channel. The two shares are added last, so values differ from the concatenated
        # convolution's within float32 rounding (tests/models/test_baselines.py).
        padding = tuple(self.padding)
        data = direct_conv2d(x, self.weight[:, :-COORDINATE_CHANNELS], None, padding)
        coordinates = coordinate_channels(x[:1]).contiguous()
        share = direct_conv2d(
            coordinates, self.weight[:, -COORDINATE_CHANNELS:], self.bias, padding
        )
        return data + share


class CoordConvNet(nn.Sequential):
    """CNN whose convolutions also see each point's (row, column) in [-1, 1] (CoordConv).

    The cheapest way to hand a shared convolution the location it needs; SMoE should beat it
    because a few coordinate channels cannot easily encode an irregular region map. As in the
    reference, every convolution gets the coordinate channels (``coords: every``);
    ``coords: first`` adds them before the first convolution only.
    """

    def __init__(
        self,
        in_channels: int,
        height: int,
        width: int,
        *,
        hidden: Sequence[int] = (4,),
        kernel_size: int = 3,
        batchnorm: bool = True,
        activation: str = "relu",
        bias: bool = False,
        coords: str = "every",
        init: str = "reference",
    ) -> None:
        _check_kernel_size(kernel_size)
        _check_choice("coords", coords, COORDS)
        widths = _widths(in_channels, hidden)
        if coords == "every":

            def conv(cin: int, cout: int) -> nn.Module:
                return CoordConv2d(cin, cout, kernel_size, bias=bias)

            super().__init__(*_layer_stack(widths, conv, batchnorm, activation, init))
            return
        cnn = ConvNet(
            in_channels + 2,
            height,
            width,
            hidden=hidden,
            kernel_size=kernel_size,
            batchnorm=batchnorm,
            activation=activation,
            bias=bias,
            init=init,
        )
        super().__init__(AddCoords(), *cnn)


class LocallyConnectedNet(nn.Sequential):
    """Locally connected network (LCN): an independent stencil at every grid point.

    Expressive enough for any location-dependent stencil but shares nothing, so it needs
    H * W times the parameters of a CNN; SMoE aims for its accuracy with far fewer weights.
    Default: the reference's single bias-free 3x3 layer (36,864 parameters on 64 x 64).
    """

    def __init__(
        self,
        in_channels: int,
        height: int,
        width: int,
        *,
        hidden: Sequence[int] = (),
        kernel_size: int = 3,
        batchnorm: bool = True,
        activation: str = "relu",
        bias: bool = False,
        init: str = "reference",
    ) -> None:
        _check_kernel_size(kernel_size)

        def local(cin: int, cout: int) -> nn.Module:
            return LocallyConnected2d(cin, cout, height, width, kernel_size, bias=bias)

        widths = _widths(in_channels, hidden)
        super().__init__(*_layer_stack(widths, local, batchnorm, activation, init))


class ConvLCN(nn.Sequential):
    """Shared convolutional features followed by a locally connected output layer.

    Tests whether location-specific weights are needed only at the end, a cheaper middle
    ground between a CNN and a full LCN. Default, as the reference: a bias-free
    ``kernel_size`` (3x3) convolution to ``hidden`` = 3 channels, then a bias-free
    ``lcn_kernel_size`` (1x1) locally connected layer to 1 channel, with no normalisation or
    activation between (27 + 3 * H * W parameters: 12,315 on 64 x 64, as many as the SMoE).
    ``batchnorm: true`` and ``activation: relu`` put them between.
    """

    def __init__(
        self,
        in_channels: int,
        height: int,
        width: int,
        *,
        hidden: int = 3,
        kernel_size: int = 3,
        lcn_kernel_size: int = 1,
        batchnorm: bool = False,
        activation: str | None = None,
        bias: bool = False,
        init: str = "reference",
    ) -> None:
        _check_kernel_size(kernel_size)
        _check_kernel_size(lcn_kernel_size, "lcn_kernel_size")
        _check_choice("init", init, INITS)
        conv_in, conv_out, _ = _widths(in_channels, [hidden])
        conv = DirectConv2d(conv_in, conv_out, kernel_size, padding=kernel_size // 2, bias=bias)
        local = LocallyConnected2d(conv_out, 1, height, width, lcn_kernel_size, bias=bias)
        modules: list[nn.Module] = [conv]
        if batchnorm:
            modules.append(DirectBatchNorm2d(conv_out))
        if activation is not None:
            modules.append(make_activation(activation))
        modules.append(local)
        _initialise([conv, local], init)
        super().__init__(*modules)


class CondConv2d(nn.Module):
    """Conditionally parameterised convolution (CondConv, Yang et al. 2019).

    Each sample gets its own kernel sum_e r_e W_e with r = sigmoid(Linear(mean over H, W of x)).
    The mixture is chosen per sample, not per location, which is the contrast with SMoE's
    spatial routing. The batch runs as one grouped convolution with one group per sample.
    ``bias`` gives both the expert kernels and the routing layer a bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        experts: int = 3,
        bias: bool = True,
    ) -> None:
        super().__init__()
        _check_kernel_size(kernel_size)
        if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
            raise ValueError(f"experts must be a positive integer, got {experts!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.experts = kernel_size, experts
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)  # as nn.Conv2d
        shape = (experts, out_channels, in_channels, kernel_size, kernel_size)
        self.weight = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.bias = (
            nn.Parameter(torch.empty(experts, out_channels).uniform_(-bound, bound))
            if bias
            else None
        )
        self.route = nn.Linear(in_channels, experts, bias=bias)

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample expert weights [B, E], each in (0, 1) and not normalised across experts."""
        return torch.sigmoid(self.route(x.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        weights = self.routing_weights(x)
        kernels = torch.einsum("be,eoikl->boikl", weights, self.weight)
        kernels = kernels.reshape(batch * self.out_channels, channels, *kernels.shape[-2:])
        bias = None if self.bias is None else (weights @ self.bias).reshape(-1)
        out = F.conv2d(
            x.reshape(1, batch * channels, height, width),
            kernels,
            bias,
            padding=self.kernel_size // 2,
            groups=batch,
        )
        return out.view(batch, self.out_channels, height, width)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"experts={self.experts}, bias={self.bias is not None}"
        )


class CondConvNet(nn.Sequential):
    """A stack of CondConv layers, shaped like :class:`ConvNet` (default: one, no biases)."""

    def __init__(
        self,
        in_channels: int,
        height: int,
        width: int,
        *,
        experts: int = 3,
        hidden: Sequence[int] = (),
        kernel_size: int = 3,
        batchnorm: bool = True,
        activation: str = "relu",
        bias: bool = False,
        init: str = "reference",
    ) -> None:
        def cond(cin: int, cout: int) -> nn.Module:
            return CondConv2d(cin, cout, kernel_size, experts, bias=bias)

        widths = _widths(in_channels, hidden)
        super().__init__(*_layer_stack(widths, cond, batchnorm, activation, init))


class MLP(nn.Sequential):
    """Fully connected network on the flattened frame.

    No locality or sharing prior at all: shows what the convolutional structure buys.
    Default, as the reference: one bias-free (C * H * W) -> (H * W) layer; ``hidden`` adds
    hidden layers with ``activation`` between.
    """

    def __init__(
        self,
        in_channels: int,
        height: int,
        width: int,
        *,
        hidden: Sequence[int] = (),
        activation: str = "relu",
        bias: bool = False,
        init: str = "reference",
    ) -> None:
        make_activation(activation)  # reject a bad name even with no hidden layer
        _check_choice("init", init, INITS)
        widths = _widths(in_channels * height * width, hidden, height * width)
        modules: list[nn.Module] = [nn.Flatten()]
        layers: list[nn.Module] = []
        for index, (cin, cout) in enumerate(pairwise(widths)):
            if index:
                modules.append(make_activation(activation))
            layers.append(nn.Linear(cin, cout, bias=bias))
            modules.append(layers[-1])
        modules.append(nn.Unflatten(1, (1, height, width)))
        _initialise(layers, init)
        super().__init__(*modules)


def persistence(in_channels: int, height: int, width: int) -> Persistence:
    """The identity forecast; takes the common constructor arguments and ignores them."""
    return Persistence()


BASELINES: dict[str, Callable[..., nn.Module]] = {
    "persistence": persistence,
    "cnn": ConvNet,
    "lcn": LocallyConnectedNet,
    "coordconv": CoordConvNet,
    "condconv": CondConvNet,
    "convlcn": ConvLCN,
    "mlp": MLP,
}
