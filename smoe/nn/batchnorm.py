"""Training-mode batch normalisation as compiled loops on the CPU.

PyTorch's CPU batch norm takes about 1 ms forward and 0.4 ms backward on the heat CNN's
hidden layer (4 channels of 32 x 64 x 64) on one thread, a third of the whole training
step once the convolutions run as direct loops (:mod:`smoe.nn.conv`). Two passes over each
channel (its mean, then the mean squared deviation from it) and one that writes
``x * scale + shift`` take about 0.3 ms; the backward's two passes (the sums of ``dy`` and
of ``dy * (x - mean)``, then ``dx``) as much. Sums run over rows in float32 lanes, their
totals in float64; the formulas are PyTorch's (biased variance to normalise, unbiased for
the running variance, ``scale = weight / sqrt(var + eps)``), so the values agree with its
within float32 rounding (tests/models/test_batchnorm.py). Evaluation, other dtypes, mixed
precision, GPUs and layers without an affine transform run PyTorch's own.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from smoe.core import compiled


def _channel_moments(x: np.ndarray, lanes: np.ndarray, moments: np.ndarray) -> None:
    """``moments[c] = (mean, biased variance)`` of ``x[:, c, :]`` (x is [B, C, N]): the mean
    first, then the squared deviations from it, each summed in ``lanes`` (N float32
    partial sums) and totalled in float64."""
    batch, channels, size = x.shape
    count = batch * size
    for c in range(channels):
        for i in range(size):
            lanes[i] = 0.0
        for b in range(batch):
            row = x[b, c]
            for i in range(size):
                lanes[i] += row[i]
        total = 0.0
        for i in range(size):
            total += lanes[i]
        mean = total / count
        centre = np.float32(mean)
        for i in range(size):
            lanes[i] = 0.0
        for b in range(batch):
            row = x[b, c]
            for i in range(size):
                deviation = row[i] - centre
                lanes[i] += deviation * deviation
        total = 0.0
        for i in range(size):
            total += lanes[i]
        moments[c, 0] = mean
        moments[c, 1] = total / count


def _scale_shift(x: np.ndarray, scale: np.ndarray, shift: np.ndarray, out: np.ndarray) -> None:
    """``out[b, c] = x[b, c] * scale[c] + shift[c]``."""
    batch, channels, size = x.shape
    for b in range(batch):
        for c in range(channels):
            source, target = x[b, c], out[b, c]
            a, s = scale[c], shift[c]
            for i in range(size):
                target[i] = source[i] * a + s


def _backward_sums(
    x: np.ndarray, grad: np.ndarray, mean: np.ndarray, lanes: np.ndarray, sums: np.ndarray
) -> None:
    """``sums[c] = (sum of dy, sum of dy * (x - mean))`` over ``[:, c, :]``."""
    batch, channels, size = x.shape
    for c in range(channels):
        centre = mean[c]
        for i in range(size):
            lanes[0, i] = 0.0
            lanes[1, i] = 0.0
        for b in range(batch):
            source, gradient = x[b, c], grad[b, c]
            for i in range(size):
                lanes[0, i] += gradient[i]
                lanes[1, i] += gradient[i] * (source[i] - centre)
        total, dot = 0.0, 0.0
        for i in range(size):
            total += lanes[0, i]
            dot += lanes[1, i]
        sums[c, 0] = total
        sums[c, 1] = dot


def _input_gradient(
    x: np.ndarray,
    grad: np.ndarray,
    mean: np.ndarray,
    mean_grad: np.ndarray,
    slope: np.ndarray,
    gain: np.ndarray,
    out: np.ndarray,
) -> None:
    """``dx = (dy - mean(dy) - (x - mean) * slope) * gain`` per channel, with ``slope =
    sum(dy * (x - mean)) / (var + eps) / count`` and ``gain = weight / sqrt(var + eps)``."""
    batch, channels, size = x.shape
    for b in range(batch):
        for c in range(channels):
            source, gradient, target = x[b, c], grad[b, c], out[b, c]
            centre, offset, k, g = mean[c], mean_grad[c], slope[c], gain[c]
            for i in range(size):
                target[i] = (gradient[i] - offset - (source[i] - centre) * k) * g


_channel_moments = compiled.compiled(_channel_moments)
_scale_shift = compiled.compiled(_scale_shift)
_backward_sums = compiled.compiled(_backward_sums)
_input_gradient = compiled.compiled(_input_gradient)


def _rows(t: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] (contiguous) as the loops' [B, C, H * W] array."""
    return t.view(t.shape[0], t.shape[1], -1).numpy()


class _BatchNormTraining(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        x = x.detach().contiguous()
        rows = _rows(x)
        moments = np.empty((x.shape[1], 2))
        _channel_moments(rows, np.empty(rows.shape[2], dtype=np.float32), moments)
        mean64, var64 = moments[:, 0], moments[:, 1]
        invstd64 = 1.0 / np.sqrt(var64 + eps)
        scale = (invstd64 * weight.detach().double().numpy()).astype(np.float32)
        shift = (bias.detach().double().numpy() - mean64 * scale).astype(np.float32)
        out = torch.empty_like(x)
        _scale_shift(rows, scale, shift, _rows(out))
        if running_mean is not None:
            count = rows.shape[0] * rows.shape[2]
            unbiased = var64 * count / max(count - 1, 1)
            running_mean.mul_(1 - momentum).add_(torch.from_numpy(mean64).float(), alpha=momentum)
            running_var.mul_(1 - momentum).add_(torch.from_numpy(unbiased).float(), alpha=momentum)
        ctx.save_for_backward(x, weight)
        ctx.mean, ctx.invstd = mean64, invstd64
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        rows, grads = _rows(x), _rows(grad_out)
        count = rows.shape[0] * rows.shape[2]
        mean = ctx.mean.astype(np.float32)
        sums = np.empty((x.shape[1], 2))
        _backward_sums(rows, grads, mean, np.empty((2, rows.shape[2]), np.float32), sums)
        total, dot = sums[:, 0], sums[:, 1]
        grad_input = None
        if ctx.needs_input_grad[0]:
            gain = ctx.invstd * weight.detach().double().numpy()
            slope = dot * ctx.invstd**2 / count
            grad_input = torch.empty_like(x)
            _input_gradient(
                rows,
                grads,
                mean,
                (total / count).astype(np.float32),
                slope.astype(np.float32),
                gain.astype(np.float32),
                _rows(grad_input),
            )
        grad_weight = torch.from_numpy(dot * ctx.invstd).to(weight.dtype)
        grad_bias = torch.from_numpy(total).to(weight.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None


class DirectBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, buffers and state dict) whose training-mode
    pass runs as the module's compiled loops on the CPU (see the module's docstring)."""

    def _fast_path(self, x: torch.Tensor) -> bool:
        return (
            self.training
            and self.affine
            and x.dim() == 4
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and x.shape[0] * x.shape[2] * x.shape[3] > 1
            and not torch.is_autocast_enabled("cpu")
            and compiled.available()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast_path(x):
            return super().forward(x)
        self._check_input_dim(x)
        tracking = self.track_running_stats and self.running_mean is not None
        momentum = 0.0 if self.momentum is None else self.momentum
        if tracking and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative average, as nn.BatchNorm2d keeps it
                momentum = 1.0 / float(self.num_batches_tracked)
        return _BatchNormTraining.apply(
            x,
            self.weight,
            self.bias,
            self.running_mean if tracking else None,
            self.running_var if tracking else None,
            momentum,
            self.eps,
        )
