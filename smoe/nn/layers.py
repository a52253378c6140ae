"""Building blocks shared by gates and baselines: locally connected layers, coordinates."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from smoe.nn.local import LocalCorrelation


class LocallyConnected2d(nn.Module):
    """A convolution whose weights differ at every output location ("LCN").

    Input [B, C, H, W] -> output [B, O, H, W] with "same" zero padding, stride 1. Weight
    [O, C * k * k, H * W]: as many parameters as H * W independent convolutions, which is
    what lets a baseline learn location-dependent stencils without a gate.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        height: int,
        width: int,
        kernel_size: int = 3,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.height, self.width, self.kernel_size = height, width, kernel_size
        fan_in = in_channels * kernel_size * kernel_size
        bound = 1.0 / math.sqrt(fan_in)
        self.weight = nn.Parameter(
            torch.empty(out_channels, fan_in, height * width).uniform_(-bound, bound)
        )
        self.bias = (
            nn.Parameter(torch.empty(out_channels, height * width).uniform_(-bound, bound))
            if bias
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        if (height, width) != (self.height, self.width):
            raise ValueError(
                f"LocallyConnected2d built for {self.height}x{self.width}, got {height}x{width}"
            )
        if (
            x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
        ):
            out = LocalCorrelation.apply(x, self.weight, self.kernel_size)
            if self.bias is not None:
                out = out + self.bias.view(1, self.out_channels, height, width)
            return out
        patches = F.unfold(x, self.kernel_size, padding=self.kernel_size // 2)  # [B, C*k*k, HW]
        out = torch.einsum("bpl,opl->bol", patches, self.weight.to(patches.dtype))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(batch, self.out_channels, height, width)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, size={self.height}x{self.width}, "
            f"kernel_size={self.kernel_size}, bias={self.bias is not None}"
        )


def coordinate_channels(x: torch.Tensor) -> torch.Tensor:
    """Two channels holding each point's row and column, scaled to [-1, 1] (CoordConv)."""
    batch, _, height, width = x.shape
    rows = torch.linspace(-1.0, 1.0, height, device=x.device, dtype=x.dtype)
    cols = torch.linspace(-1.0, 1.0, width, device=x.device, dtype=x.dtype)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))
    return grid.unsqueeze(0).expand(batch, -1, -1, -1)


class AddCoords(nn.Module):
    """Append the two coordinate channels of :func:`coordinate_channels` to the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, coordinate_channels(x)], dim=1)


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name, so configs can choose it as a plain string."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()
