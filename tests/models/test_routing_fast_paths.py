"""The routing backward's fast paths give exactly what the plain formulas give.

The reference below is the backward as first written (``torch.kthvalue`` quantile,
``masked_fill`` / ``where`` damping, zero-fill and ``scatter_`` of expert gradients, RC
labels materialised and averaged over the batch). The fast paths must match it bit for bit,
not within a tolerance: a training run replays tens of thousands of steps, and any rounding
difference could move a routing threshold.
"""

import numpy as np
import pytest
import torch

from smoe.nn.routing import (
    DAMPING_TOLERANCE,
    RC_TOLERANCE,
    RouteFunction,
    RoutingOptions,
    damp_misrouted,
    fused_cpu_applies,
    sample_quantile,
    scatter_selected,
    shared_mean_labels,
)


def reference_quantile(err: torch.Tensor, q: float) -> torch.Tensor:
    flat = err.flatten(1)
    position = q * (flat.shape[1] - 1)
    below = int(position)
    fraction = position - below
    lower = torch.kthvalue(flat, below + 1, dim=1, keepdim=True).values
    if fraction > 0:
        at_most = (flat <= lower).sum(dim=1, keepdim=True)
        larger = torch.where(flat > lower, flat, torch.inf).amin(dim=1, keepdim=True)
        upper = torch.where(at_most >= below + 2, lower, larger)
        lower = lower + fraction * (upper - lower)
    return lower.view(-1, *([1] * (err.dim() - 1)))


def reference_labels(correct, idx, experts):
    batch, k, height, width = idx.shape
    correct = correct.to(torch.float32)
    if experts > k:
        missing = (k - correct.sum(dim=1, keepdim=True)) / (experts - k)
        labels = missing.expand(batch, experts, height, width).clone()
    else:
        labels = torch.zeros(batch, experts, height, width)
    return labels.scatter_(1, idx, correct)


def reference_backward(grad_out, expert_out, logits, options):
    """Gradients of expert outputs and logits (unweighted routing, no loss scale)."""
    scores = logits[:1] if logits.stride(0) == 0 else logits
    idx = scores.max(dim=1, keepdim=True).indices.expand(logits.shape[0], -1, -1, -1)
    err = grad_out.abs().sum(dim=2) * (grad_out[:, 0].numel() / 2.0)
    threshold = reference_quantile(err, options.quantile)
    expert_grad = grad_out
    if options.damping:
        misrouted = (err > threshold + DAMPING_TOLERANCE).unsqueeze(2)
        if options.damping_factor == 0.0:
            expert_grad = expert_grad.masked_fill(misrouted, 0.0)
        else:
            expert_grad = torch.where(misrouted, expert_grad * options.damping_factor, expert_grad)
    grad_experts = torch.zeros(expert_out.shape)
    gather_idx = idx.unsqueeze(2).expand(-1, -1, expert_out.shape[2], -1, -1)
    grad_experts.scatter_(1, gather_idx, expert_grad)
    labels = reference_labels(err <= threshold + RC_TOLERANCE, idx, options.experts)
    scale = options.rc_weight / logits.numel()
    if logits.stride(0) == 0:
        mean_label = labels.mean(dim=0, keepdim=True)
        grad_logits = ((torch.sigmoid(logits[:1]) - mean_label) * scale).expand_as(logits)
    else:
        grad_logits = (torch.sigmoid(logits) - labels) * scale
    return grad_experts, grad_logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quantile_is_exactly_the_kthvalue_formula(dtype):
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        batch, height, width = (int(v) for v in torch.randint(1, 12, (3,), generator=g))
        err = torch.rand(batch, 1, height, width, generator=g, dtype=dtype)
        if trial % 3 == 0:
            err = (err * 3).round()  # ties at both order statistics
        q = (0.0, 0.3, 1.0, float(torch.rand(1, generator=g)))[trial % 4]
        fast, slow = sample_quantile(err, q), reference_quantile(err, q)
        assert fast.dtype == slow.dtype and torch.equal(fast, slow), (trial, q)


@pytest.mark.parametrize("factor", [0.0, 0.1, 0.37])
def test_damping_products_equal_masked_fill_and_where(factor):
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(5, 1, 2, 6, 7, generator=g)
    misrouted = torch.rand(5, 1, 1, 6, 7, generator=g) < 0.4
    if factor == 0.0:
        expected = grad.masked_fill(misrouted, 0.0)
    else:
        expected = torch.where(misrouted, grad * factor, grad)
    assert torch.equal(damp_misrouted(grad, misrouted, factor), expected)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("k", [1, 2])
def test_scatter_selected_equals_zero_fill_and_scatter(shared, k):
    g = torch.Generator().manual_seed(2)
    batch, experts, filters = 4, 3, 2
    scores = torch.randn(1 if shared else batch, experts, 5, 6, generator=g)
    idx = torch.topk(scores, k, dim=1).indices.expand(batch, -1, -1, -1)
    grad = torch.randn(batch, k, filters, 5, 6, generator=g)
    shape = torch.Size((batch, experts, filters, 5, 6))
    expected = torch.zeros(shape).scatter_(
        1, idx.unsqueeze(2).expand(-1, -1, filters, -1, -1), grad
    )
    assert torch.equal(scatter_selected(grad, idx, shape), expected)


@pytest.mark.parametrize("experts", [2, 3, 5, 9])
@pytest.mark.parametrize("batch", [1, 7, 32, 45])
def test_shared_mean_labels_equal_the_mean_of_the_labels(experts, batch):
    g = torch.Generator().manual_seed(experts * 100 + batch)
    idx = torch.randint(0, experts, (1, 1, 16, 16), generator=g).expand(batch, -1, -1, -1)
    for share in (0.0, 0.3, 0.9, 1.0):
        correct = torch.rand(batch, 1, 16, 16, generator=g) < share
        expected = reference_labels(correct, idx, experts).mean(dim=0, keepdim=True)
        assert torch.equal(shared_mean_labels(correct, idx, experts), expected)


def test_shared_mean_labels_decline_where_they_would_round():
    """E - 1 not a power of two (labels 1/3, 1/5 ...) or k > 1: the caller averages the
    materialised labels instead."""
    idx = torch.zeros(4, 1, 3, 3, dtype=torch.long)
    correct = torch.ones(4, 1, 3, 3, dtype=torch.bool)
    assert shared_mean_labels(correct, idx, 4) is None
    assert shared_mean_labels(correct, idx, 6) is None
    assert shared_mean_labels(correct.expand(4, 2, 3, 3), idx.expand(4, 2, 3, 3), 3) is None


@pytest.mark.parametrize("experts", [3, 4])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("factor", [0.0, 0.1])
def test_backward_matches_the_plain_formulas_bit_for_bit(experts, shared, factor):
    """The whole backward (paper options: top-1, unweighted, RC loss, damping) against the
    reference, for a latent gate's shared logits and per-sample logits."""
    g = torch.Generator().manual_seed(3)
    batch = 8
    options = RoutingOptions(
        experts=experts, k=1, rc_loss=True, damping=True, damping_factor=factor, quantile=0.3
    )
    expert_out = torch.randn(batch, experts, 1, 12, 10, generator=g, requires_grad=True)
    base = torch.randn(1 if shared else batch, experts, 12, 10, generator=g)
    leaf = base.clone().requires_grad_()
    logits = leaf.expand(batch, -1, -1, -1)  # shared: stride 0 over the batch, as a latent gate
    grad_out = torch.randn(batch, 1, 1, 12, 10, generator=g) * 1e-3
    out, idx = RouteFunction.apply(expert_out, logits, logits, options, {})
    out.backward(grad_out)
    assert torch.equal(idx, logits.detach().max(dim=1, keepdim=True).indices)
    grad_experts, grad_logits = reference_backward(grad_out, expert_out, logits.detach(), options)
    assert torch.equal(expert_out.grad, grad_experts)
    expected = grad_logits.sum(dim=0, keepdim=True) if shared else grad_logits
    assert torch.equal(leaf.grad, expected)


@pytest.mark.parametrize(
    "options",
    [
        dict(damping=True, damping_factor=0.0, quantile=0.3),  # the paper's
        dict(damping=True, damping_factor=0.1, quantile=0.3),  # the quick config's
        dict(damping=False, quantile=0.5),
        dict(damping=True, quantile=0.0, error_scale=3.0),
        dict(damping=True, quantile=1.0, experts=5),
    ],
    ids=["paper", "quick", "no-damping", "q0-scaled", "q1-five-experts"],
)
def test_compiled_cpu_backward_equals_the_torch_path(options, monkeypatch):
    """The paper's layer (latent gate, top-1, RC loss) takes routing_cpu's compiled loop on
    the CPU; with it switched off the torch path must give the same gradients and logged
    values bit for bit, ties in the errors included."""
    from smoe.nn import routing_cpu

    assert routing_cpu.available(), "numba is a dependency: the compiled path must run"
    options = RoutingOptions(**{"experts": 3, "k": 1, "rc_loss": True, **options})
    g = torch.Generator().manual_seed(4)
    batch, experts = 16, options.experts
    expert_out = torch.randn(batch, experts, 1, 32, 32, generator=g)
    base = torch.randn(1, experts, 32, 32, generator=g)
    grad_out = torch.randn(batch, 1, 1, 32, 32, generator=g) * 1e-3
    grad_out[::3, :, :, :8] = grad_out[::3, :, :, 8:16]  # repeated errors: ties
    idx = base.max(dim=1, keepdim=True).indices.expand(batch, -1, -1, -1)
    assert fused_cpu_applies(grad_out, base.expand(batch, -1, -1, -1), idx, options)
    results = []
    for compiled in (True, False):
        monkeypatch.setattr(routing_cpu, "available", lambda compiled=compiled: compiled)
        experts_leaf = expert_out.clone().requires_grad_()
        leaf = base.clone().requires_grad_()
        logits = leaf.expand(batch, -1, -1, -1)
        stash = {}
        out, _ = RouteFunction.apply(experts_leaf, logits, logits, options, stash)
        out.backward(grad_out)
        results.append((experts_leaf.grad, leaf.grad, stash))
    (experts_a, gate_a, stash_a), (experts_b, gate_b, stash_b) = results
    assert torch.equal(experts_a, experts_b)
    assert torch.equal(gate_a, gate_b)
    assert stash_a.keys() == stash_b.keys()
    for key in stash_a:
        assert torch.equal(stash_a[key], stash_b[key]), key


def test_compiled_cpu_backward_is_only_taken_where_it_is_exact():
    base = torch.randn(1, 3, 8, 8)
    logits, idx = base.expand(4, -1, -1, -1), base.max(dim=1, keepdim=True).indices
    grad = torch.randn(4, 1, 1, 8, 8)
    paper = RoutingOptions(experts=3, k=1, rc_loss=True, damping=True)
    assert fused_cpu_applies(grad, logits, idx.expand(4, -1, -1, -1), paper)
    assert not fused_cpu_applies(grad, logits.contiguous(), idx, paper)  # per-sample gate
    assert not fused_cpu_applies(grad.double(), logits, idx.expand(4, -1, -1, -1), paper)
    four = RoutingOptions(experts=4, k=1, rc_loss=True)  # labels of 1/3 would round
    assert not fused_cpu_applies(
        grad, base.new_zeros(4, 4, 8, 8)[:1].expand(4, -1, -1, -1), idx.expand(4, -1, -1, -1), four
    )
    for other in (dict(rc_loss=False), dict(weighted=True)):
        options = RoutingOptions(**{**paper.__dict__, **other})
        assert not fused_cpu_applies(grad, logits, idx.expand(4, -1, -1, -1), options)
    scale = torch.tensor(1024.0)
    assert not fused_cpu_applies(grad, logits, idx.expand(4, -1, -1, -1), paper, scale)


@pytest.mark.parametrize("quantile", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_compiled_path_thresholds_are_sample_quantile_bit_for_bit(quantile):
    from smoe.nn import routing_cpu

    g = torch.Generator().manual_seed(5)
    err = torch.rand(9, 1, 13, 11, generator=g)
    err[::2] = (err[::2] * 5).round() / 7  # ties at the order statistics
    expected = sample_quantile(err, quantile).flatten()
    got = routing_cpu.sample_thresholds(err.flatten(1).numpy(), quantile)
    assert torch.equal(torch.from_numpy(got), expected)


@pytest.mark.parametrize("factor", [0.0, 0.25])
def test_compiled_loop_decides_like_the_torch_masks_at_the_thresholds(factor):
    """Errors exactly at a threshold: damping is strictly above it, a correct selection at
    or below it, as the torch path's masks."""
    from smoe.nn import routing_cpu

    g = torch.Generator().manual_seed(6)
    batch, points, experts = 6, 40, 3
    grad = torch.randn(batch, points, generator=g)
    err = torch.rand(batch, points, generator=g)
    damp_above = err[:, 3].clone()  # point 3 sits exactly on the damping threshold
    rc_at_most = err[:, 5].clone()  # point 5 exactly on the RC threshold
    chosen = torch.randint(0, experts, (points,), generator=g)
    expert_grad = np.empty((batch, experts, points), dtype=np.float32)
    count = np.zeros(points, dtype=np.float32)
    misrouted = routing_cpu._route_points(
        grad.numpy(),
        err.numpy(),
        chosen.numpy(),
        True,
        damp_above.numpy(),
        np.float32(factor),
        rc_at_most.numpy(),
        expert_grad,
        count,
    )
    mask = err > damp_above[:, None]
    damped = damp_misrouted(grad, mask, factor)
    onehot = (chosen[None, :] == torch.arange(experts)[:, None]).float()
    assert torch.equal(torch.from_numpy(expert_grad), damped[:, None, :] * onehot[None])
    assert misrouted == int(mask.sum())
    assert torch.equal(torch.from_numpy(count), (err <= rc_at_most[:, None]).float().sum(0))
