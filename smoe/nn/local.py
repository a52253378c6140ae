"""A locally connected layer's sums as shifted multiply-adds, on the CPU.

``unfold`` then ``einsum`` (a batched product per grid point) costs about 9 ms forward and
backward for the heat LCN (1 -> 1 channel, 3 x 3, 32 images of 64 x 64): ``unfold`` copies
the input nine times and the per-point products are too small for a matrix kernel. The same
sums as one multiply-add per kernel tap over the whole batch (a shifted view of the padded
input times that tap's weight map) take about 1 ms. They add the taps in the unfold order
(channel, kernel row, kernel column), starting from zero, so the values are those of a plain
dot product; they may round differently from the batched product's (tests/models/test_local.py
compares them).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def _taps(channels: int, kernel_size: int):
    """(channel, kernel row, kernel column) in unfold's order."""
    return itertools.product(range(channels), range(kernel_size), range(kernel_size))


class LocalCorrelation(torch.autograd.Function):
    """``out[b, o, y, x] = sum over c, i, j of pad(x)[b, c, y + i, x + j] * w[o, c, i, j, y, x]``
    with ``weight`` [O, C * k * k, H * W] as :class:`~smoe.nn.layers.LocallyConnected2d`
    stores it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
        batch, channels, height, width = x.shape
        radius = kernel_size // 2
        padded = F.pad(x, (radius, radius, radius, radius))
        maps = weight.view(weight.shape[0], channels, kernel_size, kernel_size, height, width)
        out = x.new_zeros(batch, weight.shape[0], height, width)
        for c, i, j in _taps(channels, kernel_size):
            out.addcmul_(padded[:, c : c + 1, i : i + height, j : j + width], maps[:, c, i, j])
        ctx.save_for_backward(padded, weight)
        ctx.kernel_size = kernel_size
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        padded, weight = ctx.saved_tensors
        k = ctx.kernel_size
        batch, channels = padded.shape[:2]
        height, width = grad_out.shape[2:]
        maps = weight.view(weight.shape[0], channels, k, k, height, width)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_maps = torch.empty_like(maps)
            for c, i, j in _taps(channels, k):
                shifted = padded[:, c : c + 1, i : i + height, j : j + width]
                grad_maps[:, c, i, j] = (grad_out * shifted).sum(0)
            grad_weight = grad_maps.view_as(weight)
        if ctx.needs_input_grad[0]:
            grad_padded = torch.zeros_like(padded)
            for c, i, j in _taps(channels, k):
                tap = (grad_out * maps[:, c, i, j]).sum(1)
                grad_padded[:, c, i : i + height, j : j + width] += tap
            radius = k // 2
            grad_x = grad_padded[:, :, radius : radius + height, radius : radius + width]
        return grad_x, grad_weight, None
