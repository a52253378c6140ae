"""The straight-through routing function against autograd, gradcheck and the paper's rules."""

import pytest
import torch
import torch.nn.functional as F

from smoe.core.errors import InputError
from smoe.nn.routing import (
    RouteFunction,
    RoutingOptions,
    rc_labels,
    route,
    sample_quantile,
    transform_scores,
)


def inputs(batch=2, experts=3, filters=1, height=4, width=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(batch, experts, filters, height, width, generator=g, dtype=dtype)
    logits = torch.randn(batch, experts, height, width, generator=g, dtype=dtype)
    return y.requires_grad_(), logits.requires_grad_()


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("filters", [1, 2])
def test_forward_gathers_the_top_k_experts(k, filters):
    y, logits = inputs(filters=filters)
    options = RoutingOptions(experts=3, k=k)
    out, idx = RouteFunction.apply(y, logits, logits, options, {})
    expected_idx = torch.topk(logits, k, dim=1).indices
    assert torch.equal(idx, expected_idx)
    gather = expected_idx.unsqueeze(2).expand(-1, -1, filters, -1, -1)
    assert torch.equal(out, torch.gather(y, 1, gather))


def test_unweighted_backward_matches_autograd_and_is_straight_through():
    y, logits = inputs()
    grad = torch.randn(2, 1, 1, 4, 5)
    options = RoutingOptions(experts=3, k=1)
    out, idx = RouteFunction.apply(y, logits, logits, options, {})
    out.backward(grad)
    # Reference: autograd of the gather for the experts, straight-through for the scores.
    y_ref, logits_ref = (t.detach().clone().requires_grad_() for t in (y, logits))
    chosen = torch.gather(logits_ref, 1, idx)
    gathered = torch.gather(y_ref, 1, idx.unsqueeze(2))
    (gathered + (chosen - chosen.detach()).unsqueeze(2)).backward(grad)
    torch.testing.assert_close(y.grad, y_ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(logits.grad, logits_ref.grad, rtol=0, atol=0)
    # Only the selected expert of each point receives gradient.
    selected = torch.zeros_like(y.grad, dtype=torch.bool).scatter_(1, idx.unsqueeze(2), True)
    assert (y.grad[~selected] == 0).all() and (y.grad[selected] != 0).all()


def test_weighted_backward_passes_gradcheck():
    y, logits = inputs(dtype=torch.float64, filters=2)
    options = RoutingOptions(experts=3, k=2, weighted=True)

    def f(y, scores):
        return RouteFunction.apply(y, scores.detach(), scores, options, {})[0]

    assert torch.autograd.gradcheck(f, (y, logits), eps=1e-6, atol=1e-6)


def test_weighted_backward_matches_autograd_of_gather_times_score():
    y, logits = inputs(filters=2)
    options = RoutingOptions(experts=3, k=2, weighted=True)
    grad = torch.randn(2, 2, 2, 4, 5)
    out, idx = RouteFunction.apply(y, logits, logits, options, {})
    out.backward(grad)
    y_ref, logits_ref = (t.detach().clone().requires_grad_() for t in (y, logits))
    reference = torch.gather(y_ref, 1, idx.unsqueeze(2).expand(-1, -1, 2, -1, -1)) * torch.gather(
        logits_ref, 1, idx
    ).unsqueeze(2)
    reference.backward(grad)
    torch.testing.assert_close(y.grad, y_ref.grad)
    torch.testing.assert_close(logits.grad, logits_ref.grad)


def test_quantile_equals_torch_quantile():
    err = torch.rand(3, 1, 7, 9)
    for q in (0.0, 0.3, 0.5, 0.77, 1.0):
        expected = torch.quantile(err.flatten(1), q, dim=1).view(-1, 1, 1, 1)
        torch.testing.assert_close(sample_quantile(err, q), expected)


def test_damping_zeroes_expert_gradient_at_misrouted_points():
    y, logits = inputs(batch=1, height=8, width=8)
    options = RoutingOptions(
        experts=3, k=1, damping=True, damping_factor=0.0, quantile=0.3, error_scale=1.0
    )
    stash = {}
    out, idx = RouteFunction.apply(y, logits, logits, options, stash)
    grad = torch.linspace(-0.1, 0.1, 64).view(1, 1, 1, 8, 8)
    out.backward(grad)
    err = grad.abs().sum(2)
    misrouted = err > torch.quantile(err.flatten(), 0.3) + 1e-3
    passed = torch.gather(y.grad, 1, idx.unsqueeze(2)).squeeze(2)
    assert (passed[misrouted] == 0).all()
    torch.testing.assert_close(passed[~misrouted], grad.squeeze(2)[~misrouted])
    assert stash["misrouted_fraction"] == pytest.approx(misrouted.float().mean().item())


def test_damping_factor_scales_instead_of_zeroing():
    y, logits = inputs(batch=1, height=8, width=8)
    options = RoutingOptions(experts=3, k=1, damping=True, damping_factor=0.25, error_scale=1.0)
    out, idx = RouteFunction.apply(y, logits, logits, options, {})
    grad = torch.linspace(-0.1, 0.1, 64).view(1, 1, 1, 8, 8)
    out.backward(grad)
    passed = torch.gather(y.grad, 1, idx.unsqueeze(2)).squeeze(2)
    ratio = passed / grad.squeeze(2)
    assert set(ratio.flatten().round(decimals=5).tolist()) == {0.25, 1.0}


def test_rc_labels_follow_the_paper():
    correct = torch.tensor([[[[True, False]]]])  # one selected expert, two points
    idx = torch.tensor([[[[2, 0]]]])
    labels = rc_labels(correct, idx, experts=3)
    # point 0: expert 2 correct -> [0, 0, 1]; point 1: expert 0 wrong -> [0, .5, .5]
    assert labels[0, :, 0, 0].tolist() == [0.0, 0.0, 1.0]
    assert labels[0, :, 0, 1].tolist() == [0.0, 0.5, 0.5]
    both = rc_labels(torch.tensor([[[[True]], [[False]]]]), torch.tensor([[[[0]], [[1]]]]), 4)
    assert both[0, :, 0, 0].tolist() == [1.0, 0.0, 0.5, 0.5]  # (K - 1) / (E - K) = 1/2


def test_rc_loss_gives_the_gate_only_the_bce_gradient():
    y, logits = inputs(batch=2, height=6, width=6)
    options = RoutingOptions(
        experts=3, k=1, rc_loss=True, rc_weight=2.0, quantile=0.3, error_scale=1.0
    )
    stash = {}
    scores = logits * 1.0  # scores depend on logits: the task gradient must not arrive
    out, idx = RouteFunction.apply(y, logits, scores, options, stash)
    grad = torch.randn(2, 1, 1, 6, 6) * 1e-2
    out.backward(grad)
    err = grad.abs().sum(2)
    correct = err <= sample_quantile(err, 0.3) + 1e-5
    labels = rc_labels(correct, idx, 3)
    reference = logits.detach().clone().requires_grad_()
    (2.0 * F.binary_cross_entropy_with_logits(reference, labels)).backward()
    torch.testing.assert_close(logits.grad, reference.grad)
    assert stash["routing_classification"] == pytest.approx(
        2.0 * F.binary_cross_entropy_with_logits(logits.detach(), labels).item(), rel=1e-5
    )


def test_batch_shared_logits_give_the_same_selection_and_gradients():
    """A latent gate's logits are one map expanded over the batch; the shortcut for that
    case must equal the general computation."""
    y, _ = inputs(batch=3, height=6, width=6)
    base = torch.randn(1, 3, 6, 6)
    options = RoutingOptions(experts=3, k=1, rc_loss=True, damping=True, error_scale=1.0)
    grad = torch.randn(3, 1, 1, 6, 6) * 1e-2
    results = []
    for shared in (True, False):
        leaf = base.clone().requires_grad_()
        logits = leaf.expand(3, -1, -1, -1)
        if not shared:
            logits = logits.contiguous()
        expert_out = y.detach().clone().requires_grad_()
        stash = {}
        out, idx = RouteFunction.apply(expert_out, logits, logits, options, stash)
        out.backward(grad)
        results.append((out, idx, leaf.grad, expert_out.grad, stash["routing_classification"]))
    (out_a, idx_a, gate_a, experts_a, rc_a), (out_b, idx_b, gate_b, experts_b, rc_b) = results
    assert torch.equal(idx_a, idx_b) and torch.equal(out_a, out_b)
    torch.testing.assert_close(gate_a, gate_b)
    torch.testing.assert_close(experts_a, experts_b)
    torch.testing.assert_close(rc_a, rc_b)


def test_mse_error_scale_recovers_the_pointwise_error():
    y, logits = inputs(batch=2, height=4, width=4)
    target = torch.randn(2, 1, 1, 4, 4)
    options = RoutingOptions(experts=3, k=1, rc_loss=True, quantile=0.5)
    out, _ = RouteFunction.apply(y, logits, logits, options, {})
    F.mse_loss(out, target).backward()  # dL/dout = 2 (out - y) / N
    from smoe.nn.routing import per_point_error

    grad = 2 * (out.detach() - target) / out.numel()
    torch.testing.assert_close(per_point_error(grad, "mse"), (out.detach() - target).abs().sum(2))


def test_routing_runs_in_float32_under_autocast():
    y, logits = inputs(height=8, width=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = route(y.bfloat16(), logits.bfloat16(), RoutingOptions(), True, {})
        out, idx, scores = r.out, r.idx, r.scores
    assert out.dtype == torch.float32 and scores.dtype == torch.float32
    assert torch.equal(idx, torch.topk(logits.bfloat16().float(), 1, dim=1).indices)


def test_noise_only_in_training():
    logits = torch.zeros(1, 4, 3, 3)
    options = RoutingOptions(experts=4, k=1, noise=True)
    assert torch.equal(transform_scores(logits, options, training=False), logits)
    noisy = transform_scores(logits, options, training=True)
    assert not torch.equal(noisy, logits)
    assert 0.1 < noisy.std().item() < 0.5  # N(0, (1/E)^2) with E = 4


def test_score_transforms():
    logits = torch.tensor([[[[-2.0]], [[1.0]]]])
    options = RoutingOptions(experts=2, activation="relu", absolute=True, softmax=True)
    expected = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    torch.testing.assert_close(transform_scores(logits, options, False).flatten(), expected)


@pytest.mark.parametrize(
    "options, message",
    [
        (RoutingOptions(experts=3, k=4), "k=4 must be between 1 and experts=3"),
        (RoutingOptions(experts=3, k=0), "k=0"),
        (RoutingOptions(activation="swish"), "routing activation 'swish'"),
        (RoutingOptions(quantile=1.5), "quantile"),
        (RoutingOptions(damping_factor=2.0), "damping_factor"),
    ],
)
def test_bad_routing_options(options, message):
    with pytest.raises(InputError, match=message):
        options.validate()


def _scaled_step(scale, use_scaler=False, device="cpu"):
    """One training step of the paper's heat SMoE (RC loss, damping) with the loss multiplied
    by ``scale`` before backward; returns the unscaled gradients and the routing stats. On
    CUDA the forward runs under fp16 autocast, as the paper's runs did."""
    from smoe.nn.layer import SMoENet, set_loss_scale

    torch.manual_seed(0)
    model = SMoENet(
        1, 12, 10, gate="latent", experts=3, k=1, rc_loss=True, damping=True, quantile=0.3
    ).to(device)
    x = torch.rand(4, 1, 12, 10, generator=torch.Generator().manual_seed(1))
    y = x + 0.01 * torch.rand(4, 1, 12, 10, generator=torch.Generator().manual_seed(2))
    x, y = x.to(device), y.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device, init_scale=scale) if use_scaler else None
    set_loss_scale(model, scaler if use_scaler else scale)
    with torch.autocast(device, dtype=torch.float16, enabled=device == "cuda"):
        pred = model(x)
    loss = F.mse_loss(pred.float(), y)
    if use_scaler:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        (loss * scale).backward()
    grads = {
        name: p.grad.clone() if use_scaler else p.grad / scale
        for name, p in model.named_parameters()
    }
    stats = {key: float(value) for key, value in model.final.stats.items()}
    return model.final.last_selection.clone(), grads, stats


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    "use_scaler, device",
    [(False, "cpu"), (True, "cpu"), pytest.param(True, "cuda", marks=CUDA)],
)
def test_a_loss_scale_changes_no_selection_damping_or_gradient(use_scaler, device):
    """fp16 training multiplies the loss by S (2**16 by default); the routing must see the
    true gradient: the same damped points, the same RC labels and loss, the same gate and
    expert gradients as with S = 1 (powers of two scale float32 exactly)."""
    idx1, grads1, stats1 = _scaled_step(1.0, device=device)
    idx_s, grads_s, stats_s = _scaled_step(2.0**16, use_scaler, device)
    assert torch.equal(idx1, idx_s)
    assert stats1 == stats_s and 0 < stats1["misrouted_fraction"] < 1
    assert stats1["routing_classification"] > 0
    assert grads1.keys() == grads_s.keys() == {"layers.0.experts.weight", "layers.0.gate.logits"}
    for name in grads1:
        assert torch.equal(grads1[name], grads_s[name]), name


@pytest.mark.parametrize("data", ["random", "heat"])
def test_a_fresh_scalers_first_steps_are_the_unscaled_steps(data, monkeypatch):
    """The paper's layer on 8 fields of 64 x 64 (32,768 points): unscaled, the CPU backward
    takes the compiled loop; under a fresh ``GradScaler`` (its scale made on the first
    forward, 2**16) the torch path divides by the scale. Three training steps each: the
    same selections, RC loss, misrouted share and unscaled gradients, bit for bit."""
    import numpy as np

    from smoe.families.heat.registry import build_model
    from smoe.nn.layer import SMoENet, set_loss_scale

    mask = np.load("tests/fixtures/paper_mask.npy")
    generator = build_model(
        "generator", {}, 1, 64, 64, mask=mask, region_diffusivity=(0.0025, 0.025, 0.25)
    )

    def steps(scaler):
        torch.manual_seed(0)
        model = SMoENet(
            1, 64, 64, gate="latent", experts=3, k=1, rc_loss=True, damping=True, quantile=0.3
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        if scaler is not None:
            set_loss_scale(model, scaler)
        g = torch.Generator().manual_seed(1)
        seen = []
        for _ in range(3):
            x = torch.rand(8, 1, 64, 64, generator=g)
            if data == "heat":  # a cool field with hot spots, one true diffusion step
                x = 0.1 * x + (torch.rand(8, 1, 64, 64, generator=g) > 0.995).float()
                with torch.no_grad():
                    y = generator(x)
            else:
                y = torch.rand(8, 1, 64, 64, generator=g)
            optimizer.zero_grad()
            loss = F.mse_loss(model(x), y)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                scaler.step(optimizer)
                scaler.update()
            stats = {key: float(value) for key, value in model.final.stats.items()}
            grads = [p.grad.clone() for p in model.parameters()]
            seen.append((model.final.last_selection.clone(), stats, grads))
        return seen

    from smoe.nn import routing_cpu

    compiled_loops = []
    loop = routing_cpu.top1_shared_backward
    monkeypatch.setattr(
        routing_cpu,
        "top1_shared_backward",
        lambda *args: compiled_loops.append(1) or loop(*args),
    )
    plain = steps(None)
    assert len(compiled_loops) == 3  # every unscaled step took the compiled loop
    scaled = steps(torch.amp.GradScaler("cpu"))
    assert len(compiled_loops) == 3
    for (idx, stats, grads), (idx_s, stats_s, grads_s) in zip(plain, scaled, strict=True):
        assert torch.equal(idx, idx_s)
        assert stats == stats_s and 0 < stats["misrouted_fraction"] < 1
        for grad, grad_s in zip(grads, grads_s, strict=True):
            assert torch.equal(grad, grad_s)
