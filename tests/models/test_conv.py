"""The direct-loop convolution: torch's convolution within float32 rounding, forward and
backward, fixed sums (evaluation and training see the same values), exact in float64."""

import pytest
import torch
from torch import nn

from smoe.core import compiled
from smoe.nn import conv
from smoe.nn.conv import DirectConv2d, _DirectConv, _FastInputGradConv

SHAPES = [  # (in, out, kernel, padding, bias): the heat baselines' layers, then others
    (1, 4, 3, 1, False),
    (4, 1, 3, 1, False),
    (3, 4, 3, 1, False),
    (6, 1, 3, 1, True),
    (3, 5, 5, 2, True),
    (2, 3, 3, 0, False),
    (2, 2, 5, 1, True),
    (1, 2, 1, 0, False),
]


def pair(cin, cout, kernel, padding, bias):
    torch.manual_seed(0)
    ours = DirectConv2d(cin, cout, kernel, padding=padding, bias=bias)
    theirs = nn.Conv2d(cin, cout, kernel, padding=padding, bias=bias)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def gradients(layer, x, grad_out):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.backward(grad_out)
    grads = {n: p.grad.double() for n, p in layer.named_parameters()}
    return {"out": out.detach().double(), "input": x.grad.double(), **grads}


@pytest.mark.parametrize("shape", SHAPES)
def test_values_and_gradients_are_torchs_convolution_within_its_rounding(shape):
    """The same products summed in another order: measured against float64, our error is
    oneDNN's float32 error or less (the weight gradient's float64 totals: 2-6x less)."""
    ours, theirs = pair(*shape)
    exact = nn.Conv2d(*shape[:2], shape[2], padding=shape[3], bias=shape[4]).double()
    exact.load_state_dict({name: t.double() for name, t in ours.state_dict().items()})
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, shape[0], 20, 24, generator=g)
    grad_out = torch.randn(theirs(x).shape, generator=g)
    values = gradients(ours, x, grad_out)
    onednn = gradients(theirs, x, grad_out)
    reference = gradients(exact, x.double(), grad_out.double())
    assert values.keys() == reference.keys()
    for name, value in values.items():
        ours_error = (value - reference[name]).abs().max().item()
        onednn_error = (onednn[name] - reference[name]).abs().max().item()
        # a few float32 ulps of the largest value, whatever oneDNN's kernel on this CPU
        ulps = 4e-7 * reference[name].abs().max().item()
        assert ours_error <= max(1.5 * onednn_error, ulps) + 1e-7, name
        assert ours_error < 1e-6 * reference[name].abs().max().item() + 1e-6, name
    assert values["input"].abs().max() > 1 and values["weight"].abs().max() > 10


def test_evaluation_sees_the_values_training_saw():
    layer, _ = pair(4, 1, 3, 1, True)
    x = torch.randn(8, 4, 16, 16)
    with torch.no_grad():
        evaluated = layer(x)
    trained = layer(x.requires_grad_(True))
    assert trained.grad_fn.name() == "_DirectConvBackward"
    assert torch.equal(evaluated, trained.detach())


@pytest.mark.parametrize("cin, cout", [(1, 4), (3, 4), (6, 1)])
def test_the_3x3_loop_adds_what_the_general_loop_adds(cin, cout):
    """The 3 x 3 specialisation is a speed-up only: the same sums, bit for bit."""
    g = torch.Generator().manual_seed(3)
    padded = torch.randn(5, cin, 18, 21, generator=g)
    weight = torch.randn(cout, cin, 3, 3, generator=g)
    general = torch.empty(5, cout, 16, 19)
    special = torch.empty(5, cout, 16, 19)
    conv._correlate(padded.numpy(), weight.numpy(), general.numpy())
    conv._correlate_3x3(padded.numpy(), weight.numpy(), special.numpy())
    assert torch.equal(general, special)
    assert general.abs().max() > 1


@pytest.mark.parametrize("function", [_DirectConv, _FastInputGradConv])
def test_the_gradients_are_exact_in_double_precision(function):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: function.apply(x, w, b, (1, 1)), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: function.apply(x, w, None, (0, 2)), (x, w))


def test_without_numba_the_layer_runs_onednns_sums(monkeypatch):
    ours, theirs = pair(4, 1, 3, 1, False)
    monkeypatch.setattr(compiled, "available", lambda: False)
    x = torch.randn(4, 4, 12, 12, requires_grad=True)
    out = ours(x)
    assert out.grad_fn.name() == "_FastInputGradConvBackward"
    assert torch.equal(out, theirs(x))


def test_other_layers_and_passes_are_torchs_own():
    strided = DirectConv2d(2, 3, 3, stride=2, padding=1)
    assert not strided._fast_path(torch.zeros(1, 2, 8, 8))
    wide = DirectConv2d(16, 16, 3, padding=1)
    assert not wide._fast_path(torch.zeros(1, 16, 8, 8))
    layer = DirectConv2d(2, 3, 3, padding=1)
    assert layer._fast_path(torch.zeros(1, 2, 8, 8))
    assert not layer._fast_path(torch.zeros(1, 2, 8, 8, dtype=torch.float64))
    x = torch.randn(4, 2, 8, 8, requires_grad=True)
    assert layer(x).grad_fn.name() == "_DirectConvBackward"
    with torch.no_grad():
        assert layer(x).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).grad_fn.name() != "_DirectConvBackward"
    assert strided(x).grad_fn.name() != "_DirectConvBackward"
