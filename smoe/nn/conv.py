"""A stride-1 convolution whose input gradient costs a forward convolution on the CPU.

oneDNN's backward-data kernel for the small channel counts of these models (a 3 x 3 layer
of 4 -> 1 channels on 32 images of 64 x 64) takes about 9 ms, against 1 ms for a forward
convolution of the same size: most of a baseline's training step. For stride 1 and no
dilation, the input gradient of a correlation with kernel ``w`` and padding ``p`` is the
correlation of the output gradient with ``w`` flipped in space and transposed in channels,
padded by ``k - 1 - p``: the same sum, in another order, so it rounds differently (within a
few float32 ulps of oneDNN's; tests/models/test_conv.py). The forward pass and the weight
and bias gradients are oneDNN's own, bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _FastInputGradConv(torch.autograd.Function):
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


class FastInputGradConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, state dict and forward values) whose input gradient
    on the CPU is a forward convolution (see the module's docstring). Layers it cannot
    speed up (stride, dilation, groups, padding modes other than zeros, or a GPU) run as
    ``nn.Conv2d``."""

    def _fast_path(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and self.stride == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and all(p < k for p, k in zip(self.padding, self.kernel_size, strict=True))
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast_path(x) or not torch.is_grad_enabled():
            return super().forward(x)
        return _FastInputGradConv.apply(x, self.weight, self.bias, tuple(self.padding))
