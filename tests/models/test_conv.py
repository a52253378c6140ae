"""The convolution with a forward-convolution input gradient: oneDNN's values everywhere but
the input gradient, and that one within float32 rounding of oneDNN's."""

import pytest
import torch
from torch import nn

from smoe.nn.conv import FastInputGradConv2d, _FastInputGradConv

SHAPES = [  # (in, out, kernel, padding, bias): the heat baselines' layers, then others
    (1, 4, 3, 1, False),
    (4, 1, 3, 1, False),
    (6, 1, 3, 1, True),
    (3, 5, 5, 2, True),
    (2, 3, 3, 0, False),
    (2, 2, 5, 1, True),
]


def pair(cin, cout, kernel, padding, bias):
    torch.manual_seed(0)
    ours = FastInputGradConv2d(cin, cout, kernel, padding=padding, bias=bias)
    theirs = nn.Conv2d(cin, cout, kernel, padding=padding, bias=bias)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def gradients(layer, x, grad_out):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.backward(grad_out)
    return out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize("shape", SHAPES)
def test_values_and_gradients_match_torchs_convolution(shape):
    ours, theirs = pair(*shape)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, shape[0], 20, 24, generator=g)
    expected_out = theirs(x)
    grad_out = torch.randn(expected_out.shape, generator=g)
    out, grad_x, grads = gradients(ours, x, grad_out)
    ref_out, ref_grad_x, ref_grads = gradients(theirs, x, grad_out)
    assert torch.equal(out, ref_out)
    assert grads.keys() == ref_grads.keys()
    for name in grads:  # oneDNN's own weight and bias gradients, bit for bit
        assert torch.equal(grads[name], ref_grads[name]), name
    # the input gradient sums the same products in another order
    torch.testing.assert_close(grad_x, ref_grad_x, rtol=1e-5, atol=1e-5)
    assert grad_x.abs().max() > 1


def test_the_input_gradient_is_exact_in_double_precision():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: _FastInputGradConv.apply(x, w, b, (1, 1)), (x, w, b)
    )
    assert torch.autograd.gradcheck(
        lambda x, w: _FastInputGradConv.apply(x, w, None, (0, 2)), (x, w)
    )


def test_other_layers_and_passes_are_torchs_own():
    strided = FastInputGradConv2d(2, 3, 3, stride=2, padding=1)
    assert not strided._fast_path(torch.zeros(1, 2, 8, 8))
    layer = FastInputGradConv2d(2, 3, 3, padding=1)
    assert layer._fast_path(torch.zeros(1, 2, 8, 8))
    assert not layer._fast_path(torch.zeros(1, 2, 8, 8, dtype=torch.float64))
    x = torch.randn(4, 2, 8, 8, requires_grad=True)
    assert layer(x).grad_fn.name() == "_FastInputGradConvBackward"
    with torch.no_grad():
        assert layer(x).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).grad_fn.name() != "_FastInputGradConvBackward"
    assert strided(x).grad_fn.name() != "_FastInputGradConvBackward"
