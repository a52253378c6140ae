"""Baselines the SMoE paper compares against, each built by name from :data:`BASELINES`.

Every constructor takes ``(in_channels, height, width, **options)`` and returns a module mapping
[B, in_channels, H, W] to the next frame [B, 1, H, W]. Together they bracket SMoE: a model that
ignores location (CNN), models that get location from extra inputs (CoordConv) or from
per-sample rather than per-location experts (CondConv), models with a separate stencil at every
point (LCN, Conv+LCN), one with no locality prior at all (MLP), and the trivial forecast
(persistence) that any learned model has to beat.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from smoe.models.layers import AddCoords, LocallyConnected2d, make_activation


def _widths(in_channels: int, hidden: Sequence[int], out_channels: int = 1) -> list[int]:
    """Channel widths [C, h1, ..., out] of a stack, checking that each is a positive integer."""
    widths = [in_channels, *hidden, out_channels]
    for width in widths:
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"channel widths must be positive integers, got {widths}")
    return widths


def _check_kernel_size(kernel_size: int) -> None:
    """Odd kernels only: "same" padding k // 2 then keeps the grid size, as every layer needs."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")


def _layer_stack(
    widths: list[int],
    layer: Callable[[int, int], nn.Module],
    batchnorm: bool,
    activation: str,
) -> list[nn.Module]:
    """Layer(w0->w1)-[BN]-act-...-Layer(w_{n-1}->w_n), with nothing after the last layer."""
    make_activation(activation)  # reject a bad name even when the stack has no hidden layer
    modules: list[nn.Module] = []
    for index, (cin, cout) in enumerate(pairwise(widths)):
        modules.append(layer(cin, cout))
        if index < len(widths) - 2:
            if batchnorm:
                modules.append(nn.BatchNorm2d(cout))
            modules.append(make_activation(activation))
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
    the model SMoE has to improve on without giving up weight sharing.
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
        bias: bool = True,
    ) -> None:
        _check_kernel_size(kernel_size)

        def conv(cin: int, cout: int) -> nn.Module:
            return nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=bias)

        super().__init__(*_layer_stack(_widths(in_channels, hidden), conv, batchnorm, activation))


class CoordConvNet(nn.Sequential):
    """CNN whose first layer also sees each point's (row, column) in [-1, 1] (CoordConv).

    The cheapest way to hand a shared convolution the location it needs; SMoE should beat it
    because a few coordinate channels cannot easily encode an irregular region map.
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
        bias: bool = True,
    ) -> None:
        cnn = ConvNet(
            in_channels + 2,
            height,
            width,
            hidden=hidden,
            kernel_size=kernel_size,
            batchnorm=batchnorm,
            activation=activation,
            bias=bias,
        )
        super().__init__(AddCoords(), *cnn)


class LocallyConnectedNet(nn.Sequential):
    """Locally connected network (LCN): an independent stencil at every grid point.

    Expressive enough for any location-dependent stencil but shares nothing, so it needs
    H * W times the parameters of a CNN; SMoE aims for its accuracy with far fewer weights.
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
        bias: bool = True,
    ) -> None:
        _check_kernel_size(kernel_size)

        def local(cin: int, cout: int) -> nn.Module:
            return LocallyConnected2d(cin, cout, height, width, kernel_size, bias=bias)

        super().__init__(*_layer_stack(_widths(in_channels, hidden), local, batchnorm, activation))


class ConvLCN(nn.Sequential):
    """Shared convolutional features followed by a locally connected output layer.

    Tests whether location-specific weights are needed only at the end, a cheaper middle
    ground between a CNN and a full LCN.
    """

    def __init__(
        self,
        in_channels: int,
        height: int,
        width: int,
        *,
        hidden: int = 4,
        kernel_size: int = 3,
        batchnorm: bool = True,
        activation: str = "relu",
    ) -> None:
        _check_kernel_size(kernel_size)
        conv_in, conv_out, _ = _widths(in_channels, [hidden])
        modules: list[nn.Module] = [
            nn.Conv2d(conv_in, conv_out, kernel_size, padding=kernel_size // 2)
        ]
        if batchnorm:
            modules.append(nn.BatchNorm2d(conv_out))
        modules.append(make_activation(activation))
        modules.append(LocallyConnected2d(conv_out, 1, height, width, kernel_size))
        super().__init__(*modules)


class CondConv2d(nn.Module):
    """Conditionally parameterised convolution (CondConv, Yang et al. 2019).

    Each sample gets its own kernel sum_e r_e W_e with r = sigmoid(Linear(mean over H, W of x)).
    The mixture is chosen per sample, not per location, which is the contrast with SMoE's
    spatial routing. The batch runs as one grouped convolution with one group per sample.
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
        self.route = nn.Linear(in_channels, experts)

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
    """A stack of CondConv layers, shaped like :class:`ConvNet`."""

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
    ) -> None:
        def cond(cin: int, cout: int) -> nn.Module:
            return CondConv2d(cin, cout, kernel_size, experts)

        super().__init__(*_layer_stack(_widths(in_channels, hidden), cond, batchnorm, activation))


class MLP(nn.Sequential):
    """Fully connected network on the flattened frame.

    No locality or sharing prior at all: shows what the convolutional structure buys.
    """

    def __init__(
        self,
        in_channels: int,
        height: int,
        width: int,
        *,
        hidden: Sequence[int] = (256,),
        activation: str = "relu",
    ) -> None:
        make_activation(activation)  # reject a bad name even with no hidden layer
        widths = _widths(in_channels * height * width, hidden, height * width)
        modules: list[nn.Module] = [nn.Flatten()]
        for index, (cin, cout) in enumerate(pairwise(widths)):
            if index:
                modules.append(make_activation(activation))
            modules.append(nn.Linear(cin, cout))
        modules.append(nn.Unflatten(1, (1, height, width)))
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
