"""The locally connected layer's shifted multiply-adds against unfold and einsum."""

import pytest
import torch
import torch.nn.functional as F

from smoe.nn.layers import LocallyConnected2d
from smoe.nn.local import LocalCorrelation


def unfolded(x, weight, kernel_size):
    """The layer's other path (GPU, mixed precision): unfold, then a product per point."""
    batch, _, height, width = x.shape
    patches = F.unfold(x, kernel_size, padding=kernel_size // 2)
    return torch.einsum("bpl,opl->bol", patches, weight).view(batch, -1, height, width)


@pytest.mark.parametrize(("cin", "cout", "kernel"), [(1, 1, 3), (1, 4, 3), (4, 1, 3), (3, 2, 5)])
def test_values_and_gradients_match_unfold_and_einsum(cin, cout, kernel):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, cin, 12, 10, generator=g)
    weight = torch.randn(cout, cin * kernel * kernel, 120, generator=g)
    grad_out = torch.randn(8, cout, 12, 10, generator=g)
    results = []
    for forward in (
        lambda x, w: LocalCorrelation.apply(x, w, kernel),
        lambda x, w: unfolded(x, w, kernel),
    ):
        xs, ws = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = forward(xs, ws)
        out.backward(grad_out)
        results.append((out.detach(), xs.grad, ws.grad))
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        assert ours.abs().max() > 1


def test_the_gradients_are_exact_in_double_precision():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 18, 20, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: LocalCorrelation.apply(x, w, 3), (x, w))


def test_the_layer_takes_the_fast_path_only_where_it_holds():
    torch.manual_seed(0)
    layer = LocallyConnected2d(2, 3, 6, 5)
    x = torch.randn(4, 2, 6, 5, requires_grad=True)
    out = layer(x)
    assert out.grad_fn.next_functions[0][0].name() == "LocalCorrelationBackward"
    expected = unfolded(x, layer.weight, 3) + layer.bias.view(1, 3, 6, 5)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "LocalCorrelation" not in layer(x).grad_fn.next_functions[0][0].name()
