"""A stride-1 convolution of few channels as compiled direct loops on the CPU.

oneDNN's kernels are built for channel blocks of 8 or 16; on the heat baselines' layers (a
3 x 3 convolution of 1 -> 4 or 4 -> 1 channels on 32 images of 64 x 64) its forward pass
takes 1-2 ms, its weight gradient 1-2 ms and its input gradient 9 ms: a few GFLOP/s, most
of a baseline's training step. The same sums as direct loops (for each output row, one
multiply-add per input channel and kernel tap over the row, which the compiler vectorises)
take 0.2-0.7 ms each:

* forward: ``out[b, o, y, x]`` adds ``w[o, i, ky, kx] * pad(x)[b, i, y + ky, x + kx]`` over
  (i, ky, kx) in that order, starting from zero (the bias, if any, is added last);
* input gradient: the correlation of the output gradient with the kernel flipped in space
  and transposed in channels, padded by ``k - 1 - p`` (the same loop);
* weight gradient: per weight, 64-wide float32 partial sums over (image, row), then their
  total in float64.

Every value is a fixed sum in a fixed order, whatever the thread count (the loops run on
one thread), and within float32 rounding of oneDNN's (tests/models/test_conv.py). Without
numba (a platform it does not ship for) the layer runs oneDNN's forward and weight
gradient and the input gradient as a forward convolution: the same sums in oneDNN's order.
Layers these loops do not cover (stride, dilation, groups, other padding modes, wide layers,
other dtypes, mixed precision, a GPU) run as ``nn.Conv2d``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from smoe.core import compiled

MAX_CHANNEL_PRODUCT = 64
"""Widest layer (in x out channels) the direct loops take; oneDNN wins on wider ones."""


def _correlate(padded: np.ndarray, weight: np.ndarray, out: np.ndarray) -> None:
    """``out[b, o] = sum over (i, ky, kx) of weight[o, i, ky, kx] * padded[b, i, shifted]``."""
    batch, in_channels = padded.shape[0], padded.shape[1]
    out_channels, kernel_h, kernel_w = weight.shape[0], weight.shape[2], weight.shape[3]
    height, width = out.shape[2], out.shape[3]
    for b in range(batch):
        for o in range(out_channels):
            for y in range(height):
                row = out[b, o, y]
                for x in range(width):
                    row[x] = 0.0
                for i in range(in_channels):
                    for ky in range(kernel_h):
                        source = padded[b, i, y + ky]
                        for kx in range(kernel_w):
                            tap = weight[o, i, ky, kx]
                            for x in range(width):
                                row[x] += tap * source[x + kx]


def _correlate_3x3(padded: np.ndarray, weight: np.ndarray, out: np.ndarray) -> None:
    """:func:`_correlate` for 3 x 3 kernels, the nine taps of an input channel in one pass
    over the row: the same additions in the same order, half the time."""
    batch, in_channels = padded.shape[0], padded.shape[1]
    out_channels = weight.shape[0]
    height, width = out.shape[2], out.shape[3]
    for b in range(batch):
        for o in range(out_channels):
            for y in range(height):
                row = out[b, o, y]
                for x in range(width):
                    row[x] = 0.0
                for i in range(in_channels):
                    r0, r1, r2 = padded[b, i, y], padded[b, i, y + 1], padded[b, i, y + 2]
                    w = weight[o, i]
                    w0, w1, w2 = w[0, 0], w[0, 1], w[0, 2]
                    w3, w4, w5 = w[1, 0], w[1, 1], w[1, 2]
                    w6, w7, w8 = w[2, 0], w[2, 1], w[2, 2]
                    for x in range(width):
                        total = row[x]
                        total += w0 * r0[x]
                        total += w1 * r0[x + 1]
                        total += w2 * r0[x + 2]
                        total += w3 * r1[x]
                        total += w4 * r1[x + 1]
                        total += w5 * r1[x + 2]
                        total += w6 * r2[x]
                        total += w7 * r2[x + 1]
                        total += w8 * r2[x + 2]
                        row[x] = total


def _weight_gradient(
    padded: np.ndarray, grad_out: np.ndarray, partial: np.ndarray, grad_weight: np.ndarray
) -> None:
    """``grad_weight[o, i, ky, kx]`` = sum over (b, y, x) of ``grad_out[b, o, y, x] *
    padded[b, i, y + ky, x + kx]``: row-wide float32 partial sums (``partial``, one row per
    weight), added up in float64 at the end."""
    batch, in_channels = padded.shape[0], padded.shape[1]
    out_channels, height, width = grad_out.shape[1], grad_out.shape[2], grad_out.shape[3]
    kernel_h, kernel_w = grad_weight.shape[2], grad_weight.shape[3]
    partial[:] = 0.0
    for b in range(batch):
        for y in range(height):
            for o in range(out_channels):
                gradient = grad_out[b, o, y]
                for i in range(in_channels):
                    for ky in range(kernel_h):
                        source = padded[b, i, y + ky]
                        for kx in range(kernel_w):
                            sums = partial[o, i, ky, kx]
                            for x in range(width):
                                sums[x] += gradient[x] * source[x + kx]
    for o in range(out_channels):
        for i in range(in_channels):
            for ky in range(kernel_h):
                for kx in range(kernel_w):
                    total = 0.0
                    for x in range(width):
                        total += partial[o, i, ky, kx, x]
                    grad_weight[o, i, ky, kx] = total


_correlate = compiled.compiled(_correlate)
_correlate_3x3 = compiled.compiled(_correlate_3x3)
_weight_gradient = compiled.compiled(_weight_gradient)


def _padded(x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """``x`` zero-padded by (rows, columns), contiguous, as the loops read it."""
    return F.pad(x.detach(), (padding[1], padding[1], padding[0], padding[0])).contiguous()


def correlate(x: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=padding)`` (stride 1, no bias) as the direct loops."""
    return _correlate_padded(_padded(x, padding), weight)


def _correlate_padded(padded: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    weight = weight.detach().contiguous()
    kernel_h, kernel_w = weight.shape[2:]
    height, width = padded.shape[2] - kernel_h + 1, padded.shape[3] - kernel_w + 1
    out = padded.new_empty(padded.shape[0], weight.shape[0], height, width)
    loop = _correlate_3x3 if (kernel_h, kernel_w) == (3, 3) else _correlate
    loop(padded.numpy(), weight.numpy(), out.numpy())
    return out


class _DirectConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        padded = _padded(x, padding)
        weight = weight.detach().contiguous()  # a slice of a layer's weight is one too
        out = _correlate_padded(padded, weight)
        if bias is not None:
            out += bias.detach().view(1, -1, 1, 1)
        ctx.save_for_backward(padded, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        padded, weight = ctx.saved_tensors
        needs_input, needs_weight, needs_bias, _ = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        grad_input = grad_weight = grad_bias = None
        if needs_input:
            kernel = weight.shape[2:]
            full = tuple(k - 1 - p for k, p in zip(kernel, ctx.padding, strict=True))
            grad_input = correlate(grad_out, weight.flip(2, 3).transpose(0, 1), full)
        if needs_weight:
            partial = padded.new_empty(*weight.shape, grad_out.shape[3])
            grad_weight = weight.new_empty(weight.shape)
            _weight_gradient(padded.numpy(), grad_out.numpy(), partial.numpy(), grad_weight.numpy())
        if needs_bias and ctx.has_bias:
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_input, grad_weight, grad_bias, None


class _FastInputGradConv(torch.autograd.Function):
    """oneDNN's forward and weight gradient, the input gradient as a forward convolution
    (oneDNN's backward-data kernel takes 9 ms on these shapes): the path without numba."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, padding=padding)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        needs_input, needs_weight, needs_bias, _ = ctx.needs_input_grad
        grad_input = grad_weight = grad_bias = None
        if needs_input:
            full = [k - 1 - p for k, p in zip(weight.shape[2:], ctx.padding, strict=True)]
            grad_input = F.conv2d(grad_out, weight.flip(2, 3).transpose(0, 1), padding=full)
        if needs_weight or needs_bias:
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad_out,
                x,
                weight,
                [weight.shape[0]] if ctx.has_bias else None,
                [1, 1],
                list(ctx.padding),
                [1, 1],
                False,
                [0, 0],
                1,
                [False, needs_weight, needs_bias and ctx.has_bias],
            )
        return grad_input, grad_weight, grad_bias, None


class DirectConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) that runs as the module's direct
    loops on the CPU, in training and evaluation alike, so a model's validation values
    are the ones its training saw (see the module's docstring)."""

    def _fast_path(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and self.stride == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and all(p < k for p, k in zip(self.padding, self.kernel_size, strict=True))
            and self.in_channels * self.out_channels <= MAX_CHANNEL_PRODUCT
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast_path(x):
            return super().forward(x)
        return direct_conv2d(x, self.weight, self.bias, tuple(self.padding))


def direct_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int]
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=padding)`` (stride 1, float32, CPU) as the direct
    loops, with or without autograd (the same forward either way); oneDNN's sums where numba
    is missing."""
    if compiled.available():
        return _DirectConv.apply(x, weight, bias, padding)
    if not torch.is_grad_enabled():
        return F.conv2d(x, weight, bias, padding=padding)
    return _FastInputGradConv.apply(x, weight, bias, padding)
