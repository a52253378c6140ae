"""The SMoE routing backward of the paper's layer in a few passes on the CPU.

For a latent gate (one routing map shared by the batch), top-1, unweighted routing and one
filter per expert, what the backward of :class:`smoe.nn.routing.RouteFunction` does
per point (the per-point error, each sample's error quantile, damping, the expert gradients
and the count of correct selections behind the RC labels) takes about ten torch operations,
a quarter of a training step on two cores. Here the error and the quantile are two numpy
passes and one ``numpy.partition``, and the rest one loop compiled by numba. Every value is
computed with the same float32 operations in the same order, so the results are bit for bit
those of the torch path (tests/models/test_routing_fast_paths.py compares them); the loop
runs on one thread, so they do not depend on the thread count either.

Without numba (a platform it does not support) the torch path runs instead.
"""

from __future__ import annotations

import numpy as np
import torch

from smoe.core import compiled


def available() -> bool:
    """Whether the compiled loop runs (tests and benchmarks switch it off to compare)."""
    return compiled.available()


def _route_points(
    grad: np.ndarray,
    err: np.ndarray,
    chosen: np.ndarray,
    damp: bool,
    damp_above: np.ndarray,
    damping_factor: np.float32,
    rc_at_most: np.ndarray,
    expert_grad: np.ndarray,
    correct_count: np.ndarray,
) -> int:
    """Fill ``expert_grad`` [B, E, P] and ``correct_count`` [P]; return the misrouted count.

    ``grad`` [B, P] is dL/dout of the one selection (one filter), ``err`` [B, P] its
    per-point error, ``chosen`` [P] the shared selected expert, ``damp_above`` and
    ``rc_at_most`` [B] each sample's thresholds. Every value is computed with the float32
    operations of the torch path (``damp_misrouted``, ``scatter_selected``, the ``correct``
    mask summed over the batch).
    """
    batch, points = grad.shape
    experts = expert_grad.shape[1]
    zero = np.float32(0.0)
    one = np.float32(1.0)
    row = np.empty(points, dtype=np.float32)
    misrouted_total = 0
    for b in range(batch):
        above, at_most = damp_above[b], rc_at_most[b]
        for p in range(points):  # damping (value * 1 or * factor) and the correct count
            value = grad[b, p]
            if damp:
                misrouted = err[b, p] > above
                misrouted_total += misrouted
                value = np.float32(value * (damping_factor if misrouted else one))
            row[p] = value
            correct_count[p] += one if err[b, p] <= at_most else zero
        for e in range(experts):  # contiguous rows: the compiler vectorises the select
            for p in range(points):
                value = row[p]
                expert_grad[b, e, p] = value if chosen[p] == e else np.float32(value * zero)
    return misrouted_total


_route_points = compiled.compiled(_route_points)


def order_statistics(
    rows: np.ndarray, below: int, with_next: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per row of ``rows`` [B, P], the order statistics ``below`` and ``below + 1`` (0-based),
    each [B, 1] (the second None unless ``with_next``).

    One ``numpy.partition`` places each row's ``below``-th smallest value at ``below`` with
    every larger-or-equal value after it, so the next order statistic is the minimum of the
    rest; partitioning at both positions at once is ten times slower in numpy, and numba's
    partition ten times slower again.
    """
    parted = np.partition(rows, below, axis=1)
    lower = parted[:, below : below + 1].copy()
    if not with_next:
        return lower, None
    return lower, parted[:, below + 1 :].min(axis=1, keepdims=True)


def sample_thresholds(err: np.ndarray, quantile: float) -> np.ndarray:
    """Each row's q-quantile of ``err`` [B, P] (float32) [B], as
    :func:`smoe.nn.routing.sample_quantile` computes it: the two order statistics around
    q (P - 1), interpolated in float32."""
    position = quantile * (err.shape[1] - 1)
    below = int(position)
    fraction = position - below
    lower, upper = order_statistics(err, below, fraction > 0)
    if fraction > 0:
        lower = lower + np.float32(fraction) * (upper - lower)
    return lower[:, 0]


def top1_shared_backward(
    grad_out: torch.Tensor,
    idx: torch.Tensor,
    experts: int,
    error_factor: float,
    quantile: float,
    damp: bool,
    damp_offset: float,
    damping_factor: float,
    rc_offset: float,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Expert gradients [B, E, 1, H, W], the count of correct selections [1, 1, H, W]
    (float32) and the number of misrouted points, from ``grad_out`` [B, 1, 1, H, W] and the
    shared selection ``idx`` [B, 1, H, W] (stride 0 over the batch)."""
    batch, _, _, height, width = grad_out.shape
    points = height * width
    grad = grad_out.detach().reshape(batch, points).contiguous().numpy()
    chosen = idx[0, 0].reshape(points).to(torch.int64).contiguous().numpy()
    err = np.abs(grad) * np.float32(error_factor)  # per_point_error, one filter
    threshold = sample_thresholds(err, quantile)
    expert_grad = np.empty((batch, experts, points), dtype=np.float32)
    correct_count = np.zeros(points, dtype=np.float32)
    misrouted = _route_points(
        grad,
        err,
        chosen,
        damp,
        threshold + np.float32(damp_offset),
        np.float32(damping_factor),
        threshold + np.float32(rc_offset),
        expert_grad,
        correct_count,
    )
    return (
        torch.from_numpy(expert_grad).view(batch, experts, 1, height, width),
        torch.from_numpy(correct_count).view(1, 1, height, width),
        int(misrouted),
    )
