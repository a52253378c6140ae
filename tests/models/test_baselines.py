import pytest
import torch
import torch.nn.functional as F

from smoe.models.baselines import BASELINES, CondConv2d
from smoe.models.layers import LocallyConnected2d, make_activation


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_names():
    assert set(BASELINES) == {
        "persistence",
        "cnn",
        "lcn",
        "coordconv",
        "condconv",
        "convlcn",
        "mlp",
    }


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize("channels", [1, 3])
def test_shape_finite_and_gradients_reach_every_parameter(name, channels):
    torch.manual_seed(0)
    model = BASELINES[name](channels, 8, 10)
    x = torch.randn(2, channels, 8, 10)
    out = model(x)
    assert out.shape == (2, 1, 8, 10)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    params = list(model.parameters())
    if name == "persistence":
        assert params == []
        return
    (out * torch.randn_like(out)).sum().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
    # Conv biases just before a batch norm get zero gradient (the norm removes the mean), so
    # "reaches" is checked as nonzero only for the weights.
    for param_name, param in model.named_parameters():
        if param_name.endswith("weight"):
            assert param.grad.abs().sum() > 0, param_name


def test_persistence_is_the_current_frame():
    x = torch.randn(3, 4, 5, 6)
    model = BASELINES["persistence"](4, 5, 6)
    torch.testing.assert_close(model(x), x[:, :1], rtol=0, atol=0)
    assert n_params(model) == 0


@pytest.mark.parametrize(
    "name, channels, options, expected",
    [
        # conv1 1*4*9 + 4, BN 2*4, conv2 4*9 + 1
        ("cnn", 1, {}, 85),
        # 3*4*9 + 4*2*9 + 2*9, no bias, no BN
        ("cnn", 3, {"hidden": [4, 2], "bias": False, "batchnorm": False}, 198),
        # single 3x3 conv with bias
        ("cnn", 2, {"hidden": []}, 19),
        # (9 + 1) per location, 8 * 10 locations
        ("lcn", 1, {}, 800),
        # (1*2*9 + 2) * 80 + BN 2*2 + (2*9 + 1) * 80
        ("lcn", 1, {"hidden": [2]}, 3124),
        # 5x5 kernel, no bias: 25 * 80
        ("lcn", 1, {"kernel_size": 5, "bias": False}, 2000),
        # conv1 (1+2)*4*9 + 4, BN 8, conv2 4*9 + 1
        ("coordconv", 1, {}, 157),
        # (3+2)*9 + 1
        ("coordconv", 3, {"hidden": []}, 46),
        # experts 3*1*1*9 + bias 3*1 + routing Linear(1, 3) 1*3 + 3
        ("condconv", 1, {}, 36),
        # layer1 2*4*2*9 + 2*4 + Linear(2, 2) 6 = 158; BN 8; layer2 2*1*4*9 + 2*1 + 10 = 84
        ("condconv", 2, {"experts": 2, "hidden": [4]}, 250),
        # conv 1*4*9 + 4, BN 8, LCN (4*9 + 1) * 80
        ("convlcn", 1, {}, 3008),
        # 80*256 + 256 + 256*80 + 80
        ("mlp", 1, {}, 41296),
        # 160*16 + 16 + 16*8 + 8 + 8*80 + 80
        ("mlp", 2, {"hidden": [16, 8]}, 3432),
        # 80*80 + 80
        ("mlp", 1, {"hidden": []}, 6480),
    ],
)
def test_parameter_counts(name, channels, options, expected):
    assert n_params(BASELINES[name](channels, 8, 10, **options)) == expected


def test_lcn_with_one_kernel_everywhere_is_a_convolution():
    torch.manual_seed(1)
    layer = LocallyConnected2d(2, 3, 8, 10, kernel_size=3)
    kernel, bias = torch.randn(3, 2, 3, 3), torch.randn(3)
    with torch.no_grad():
        layer.weight.copy_(kernel.reshape(3, 18, 1).expand(-1, -1, 80))
        layer.bias.copy_(bias.reshape(3, 1).expand(-1, 80))
    x = torch.randn(4, 2, 8, 10)
    torch.testing.assert_close(layer(x), F.conv2d(x, kernel, bias, padding=1), atol=1e-5, rtol=0)

    model = BASELINES["lcn"](2, 8, 10, kernel_size=5, bias=False)
    kernel = torch.randn(1, 2, 5, 5)
    with torch.no_grad():
        model[0].weight.copy_(kernel.reshape(1, 50, 1).expand(-1, -1, 80))
    expected = F.conv2d(x, kernel, padding=2)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_lcn_learns_different_stencils_at_different_locations():
    model = BASELINES["lcn"](1, 4, 4, bias=False)
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[0, 4, :8] = 1.0  # identity centre tap on the top half
        model[0].weight[0, 4, 8:] = -2.0  # scaled, sign-flipped on the bottom half
    x = torch.randn(2, 1, 4, 4)
    expected = torch.cat([x[:, :, :2], -2.0 * x[:, :, 2:]], dim=2)
    torch.testing.assert_close(model(x), expected)


def test_cnn_is_translation_equivariant_and_coordconv_is_not():
    torch.manual_seed(2)
    constant = torch.ones(1, 1, 8, 10)
    cnn = BASELINES["cnn"](1, 8, 10, hidden=[]).eval()
    coord = BASELINES["coordconv"](1, 8, 10, hidden=[]).eval()
    interior_cnn = cnn(constant)[0, 0, 1:-1, 1:-1]
    interior_coord = coord(constant)[0, 0, 1:-1, 1:-1]
    assert torch.allclose(interior_cnn, interior_cnn[0, 0].expand_as(interior_cnn))
    assert interior_coord.std() > 1e-3
    # the coordinate channels' contribution is exactly a conv of the [-1, 1] grids
    conv = coord[1]
    rows = torch.linspace(-1, 1, 8).view(8, 1).expand(8, 10)
    cols = torch.linspace(-1, 1, 10).view(1, 10).expand(8, 10)
    grid_input = torch.stack([torch.zeros(8, 10), rows, cols]).unsqueeze(0)
    torch.testing.assert_close(coord(torch.zeros(1, 1, 8, 10)), conv(grid_input))


def test_condconv_samples_are_independent_of_the_rest_of_the_batch():
    torch.manual_seed(3)
    model = BASELINES["condconv"](2, 8, 10, experts=4, hidden=[3]).eval()
    x = torch.randn(5, 2, 8, 10)
    batched = model(x)
    singles = torch.cat([model(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(batched, singles, atol=1e-6, rtol=1e-5)
    # and the samples really get different kernels: scaling one input changes its routing
    weights = model[0].routing_weights(torch.cat([x[:1], 3 * x[:1]]))
    assert not torch.allclose(weights[0], weights[1])


def test_condconv_with_equal_experts_is_a_scaled_convolution():
    torch.manual_seed(4)
    layer = CondConv2d(2, 3, kernel_size=3, experts=4)
    kernel, bias = torch.randn(3, 2, 3, 3), torch.randn(3)
    with torch.no_grad():
        layer.weight.copy_(kernel.expand(4, -1, -1, -1, -1))
        layer.bias.copy_(bias.expand(4, -1))
    x = torch.randn(3, 2, 8, 10)
    scale = torch.sigmoid(layer.route(x.mean(dim=(2, 3)))).sum(dim=1)  # [B]
    expected = torch.cat(
        [F.conv2d(x[i : i + 1], kernel * scale[i], bias * scale[i], padding=1) for i in range(3)]
    )
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_convlcn_and_mlp_outputs_depend_on_location():
    torch.manual_seed(5)
    x = torch.randn(2, 1, 8, 10)
    for name in ("convlcn", "mlp"):
        model = BASELINES[name](1, 8, 10).eval()
        shifted = model(torch.roll(x, 1, dims=3))
        assert not torch.allclose(torch.roll(model(x), 1, dims=3), shifted, atol=1e-4), name


@pytest.mark.parametrize("name", ["cnn", "lcn", "coordconv", "condconv", "convlcn", "mlp"])
def test_bad_activation_is_named(name):
    with pytest.raises(ValueError, match="'swish'.*relu, gelu, tanh, identity"):
        BASELINES[name](1, 8, 10, activation="swish")


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_unknown_option_is_a_type_error(name):
    with pytest.raises(TypeError):
        BASELINES[name](1, 8, 10, no_such_option=1)


@pytest.mark.parametrize("name", ["relu", "gelu", "tanh", "identity"])
def test_activations_by_name(name):
    x = torch.linspace(-2, 2, 9)
    expected = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "identity": lambda t: t}
    torch.testing.assert_close(make_activation(name)(x), expected[name](x))
    assert make_activation(name) is not make_activation(name)


@pytest.mark.parametrize(
    "name, options",
    [
        ("cnn", {"kernel_size": 4}),
        ("lcn", {"kernel_size": 2}),
        ("condconv", {"kernel_size": 0}),
        ("convlcn", {"kernel_size": 6}),
        ("cnn", {"hidden": [4, 0]}),
        ("mlp", {"hidden": [-1]}),
        ("convlcn", {"hidden": 0}),
        ("condconv", {"experts": 0}),
    ],
)
def test_invalid_sizes_are_rejected(name, options):
    with pytest.raises(ValueError):
        BASELINES[name](1, 8, 10, **options)


def test_cnn_recovers_a_known_stencil():
    torch.manual_seed(6)
    stencil = torch.tensor([[0.0, 0.2, 0.0], [0.2, 0.2, 0.2], [0.0, 0.2, 0.0]]).view(1, 1, 3, 3)
    x = torch.randn(16, 1, 12, 12)
    y = F.conv2d(x, stencil, padding=1)
    model = BASELINES["cnn"](1, 12, 12, hidden=[], bias=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(200):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
    torch.testing.assert_close(model[0].weight.detach(), stencil, atol=1e-3, rtol=0)
