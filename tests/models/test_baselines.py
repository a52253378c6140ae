import math

import pytest
import torch
import torch.nn.functional as F

from smoe.families.heat.baselines import BASELINES, CondConv2d, CoordConv2d
from smoe.nn.layers import LocallyConnected2d, make_activation


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
    "name, options, expected",
    [
        # Conv(1->4) 36 + BN 8 + Conv(4->1) 36, no biases
        ("cnn", {}, 80),
        # one bias-free 3x3 stencil per point: 9 * 64 * 64
        ("lcn", {}, 36_864),
        # CoordConv(1+2->4) 108 + BN 8 + CoordConv(4+2->1) 54
        ("coordconv", {}, 170),
        # Conv(1->3) 27 + 1x1 LCN(3->1) 3 * 64 * 64: as many as the paper's SMoE
        ("convlcn", {}, 12_315),
        # one bias-free 4096 -> 4096 layer
        ("mlp", {}, 16_777_216),
        # experts 3 * 9 + bias-free routing Linear(1, 3)
        ("condconv", {}, 30),
    ],
)
def test_reference_constructions_have_the_reference_parameter_counts(name, options, expected):
    model = BASELINES[name](1, 64, 64, **options)
    assert n_params(model) == expected
    # no layer has a bias; only batch norms have a shift (named bias)
    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    for param_name, _ in model.named_parameters():
        if param_name.endswith("bias"):
            assert param_name.rsplit(".", 1)[0] in norms, param_name


@pytest.mark.parametrize(
    "name, channels, options, expected",
    [
        # conv1 1*4*9 + 4, BN 2*4, conv2 4*9 + 1 (the construction before the reference's)
        ("cnn", 1, {"bias": True}, 85),
        # 3*4*9 + 4*2*9 + 2*9, no bias, no BN
        ("cnn", 3, {"hidden": [4, 2], "batchnorm": False}, 198),
        # single 3x3 conv with and without bias
        ("cnn", 2, {"hidden": [], "bias": True}, 19),
        ("cnn", 2, {"hidden": []}, 18),
        # 9 per location, 8 * 10 locations; (9 + 1) with a bias
        ("lcn", 1, {}, 720),
        ("lcn", 1, {"bias": True}, 800),
        # (1*2*9 + 2) * 80 + BN 2*2 + (2*9 + 1) * 80
        ("lcn", 1, {"hidden": [2], "bias": True}, 3124),
        # 5x5 kernel, no bias: 25 * 80
        ("lcn", 1, {"kernel_size": 5}, 2000),
        # coordinates before every conv: (1+2)*4*9 + BN 8 + (4+2)*9
        ("coordconv", 1, {}, 170),
        # coordinates before the first conv only, biases: (1+2)*4*9 + 4, BN 8, 4*9 + 1
        ("coordconv", 1, {"coords": "first", "bias": True}, 157),
        # (3+2)*9, and + 1 with a bias
        ("coordconv", 3, {"hidden": []}, 45),
        ("coordconv", 3, {"hidden": [], "bias": True}, 46),
        # (2+2)*4*9 + BN 8 + (4+2)*3*9 + BN 6 + (3+2)*9
        ("coordconv", 2, {"hidden": [4, 3]}, 365),
        # experts 3*1*1*9 + routing Linear(1, 3) 1*3; with biases + 3 + 3
        ("condconv", 1, {}, 30),
        ("condconv", 1, {"bias": True}, 36),
        # layer1 2*4*2*9 + 2*4 + Linear(2, 2) 6 = 158; BN 8; layer2 2*1*4*9 + 2*1 + 10 = 84
        ("condconv", 2, {"experts": 2, "hidden": [4], "bias": True}, 250),
        # conv 1*3*9, 1x1 LCN 3 * 80
        ("convlcn", 1, {}, 267),
        # the construction before the reference's: conv 1*4*9 + 4, BN 8, 3x3 LCN (4*9 + 1) * 80
        (
            "convlcn",
            1,
            {
                "hidden": 4,
                "lcn_kernel_size": 3,
                "batchnorm": True,
                "activation": "relu",
                "bias": True,
            },
            3008,
        ),
        # conv 2*5*25, 3x3 LCN 5*9 * 80
        ("convlcn", 2, {"hidden": 5, "kernel_size": 5, "lcn_kernel_size": 3}, 3850),
        # 80 * 80, no bias
        ("mlp", 1, {}, 6400),
        # 80*256 + 256 + 256*80 + 80 (the construction before the reference's)
        ("mlp", 1, {"hidden": [256], "bias": True}, 41296),
        # 160*16 + 16 + 16*8 + 8 + 8*80 + 80
        ("mlp", 2, {"hidden": [16, 8], "bias": True}, 3432),
        # 80*80 + 80
        ("mlp", 1, {"hidden": [], "bias": True}, 6480),
    ],
)
def test_parameter_counts(name, channels, options, expected):
    assert n_params(BASELINES[name](channels, 8, 10, **options)) == expected


def coordinates(x):
    """[B, 2, H, W]: row and column of each point, each evenly spaced in [-1, 1]."""
    batch, _, height, width = x.shape
    rows = torch.linspace(-1.0, 1.0, height).view(height, 1).expand(height, width)
    cols = torch.linspace(-1.0, 1.0, width).view(1, width).expand(height, width)
    return torch.stack([rows, cols]).expand(batch, 2, height, width)


def with_coordinates(x):
    return torch.cat([x, coordinates(x)], dim=1)


def batch_norm(x, weights, prefix):
    return F.batch_norm(
        x,
        weights[f"{prefix}.running_mean"],
        weights[f"{prefix}.running_var"],
        weights[f"{prefix}.weight"],
        weights[f"{prefix}.bias"],
        training=False,
        eps=1e-5,
    )


def locally_connected(x, weight, kernel_size):
    """weight [O, C*k*k, H*W]: out[b, o, p] = sum_j weight[o, j, p] * patch[b, j, p]."""
    batch, _, height, width = x.shape
    patches = F.unfold(x, kernel_size, padding=kernel_size // 2)  # [B, C*k*k, H*W]
    out = (weight.unsqueeze(0) * patches.unsqueeze(1)).sum(dim=2)
    return out.view(batch, weight.shape[0], height, width)


def reference_forward(name, weights, x):
    """The reference code's forward pass of each baseline, written with torch.nn.functional
    only and reading the weights by name, so that it checks the construction, not the code."""
    height, width = x.shape[-2:]
    if name == "cnn":  # Conv-BN-ReLU-Conv
        h = F.relu(batch_norm(F.conv2d(x, weights["0.weight"], padding=1), weights, "1"))
        return F.conv2d(h, weights["3.weight"], padding=1)
    if name == "coordconv":  # the same with the coordinates before every conv
        h = F.conv2d(with_coordinates(x), weights["0.weight"], padding=1)
        h = F.relu(batch_norm(h, weights, "1"))
        return F.conv2d(with_coordinates(h), weights["3.weight"], padding=1)
    if name == "lcn":  # one 3x3 locally connected layer
        return locally_connected(x, weights["0.weight"], 3)
    if name == "convlcn":  # 3x3 conv to 3 channels, then a 1x1 locally connected layer
        h = F.conv2d(x, weights["0.weight"], padding=1)
        assert h.shape[1] == 3
        return locally_connected(h, weights["1.weight"], 1)
    if name == "mlp":  # one dense layer over the flattened frame
        return (x.flatten(1) @ weights["1.weight"].T).view(-1, 1, height, width)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["cnn", "coordconv", "lcn", "convlcn", "mlp"])
@pytest.mark.parametrize("init", ["reference", "pytorch"])
def test_outputs_equal_the_reference_forward_pass(name, init):
    torch.manual_seed(7)
    model = BASELINES[name](1, 12, 10, init=init)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # stats and affine away from 0 / 1
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    model.eval()
    weights = {key: value.detach() for key, value in model.state_dict().items()}
    x = torch.rand(3, 1, 12, 10)
    with torch.no_grad():
        ours = model(x)
    expected = reference_forward(name, weights, x)
    assert ours.shape == expected.shape == (3, 1, 12, 10)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_reference_forward_would_catch_the_old_constructions():
    """The reference check is sharp: the former CoordConv (coordinates before the first conv
    only) and former Conv+LCN (BN and ReLU between) give other outputs with the same tensors."""
    torch.manual_seed(8)
    x = torch.rand(2, 1, 12, 10)
    old = BASELINES["coordconv"](1, 12, 10, coords="first").eval()
    new = BASELINES["coordconv"](1, 12, 10).eval()
    # the same first layer, the last conv of the old one sees no coordinates
    with torch.no_grad():
        new[0].weight.copy_(old[1].weight)
        new[3].weight[:, :4].copy_(old[4].weight)
        new[3].weight[:, 4:].uniform_(0.5, 1.0)
    weights = {key: value.detach() for key, value in new.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(new(x), reference_forward("coordconv", weights, x))
        assert (old(x) - new(x)).abs().max() > 1e-2
    old_convlcn = BASELINES["convlcn"](1, 12, 10, batchnorm=True, activation="relu").eval()
    with torch.no_grad():
        old_convlcn[1].running_mean.fill_(1.0)
        weights = {key: value.detach() for key, value in old_convlcn.state_dict().items()}
        weights["1.weight"] = weights["3.weight"]  # the LCN layer's place in the reference
        assert (old_convlcn(x) - reference_forward("convlcn", weights, x)).abs().max() > 1e-2


def bound(fan_in, gain):
    return gain * math.sqrt(3.0 / fan_in)


@pytest.mark.parametrize(
    "name, options, layers",
    [
        # (parameter name, fan_in, gain): ReLU gain sqrt(2) inside, 1 for the last layer
        ("cnn", {"bias": True}, [("0", 9, math.sqrt(2)), ("3", 36, 1.0)]),
        ("coordconv", {"bias": True}, [("0", 27, math.sqrt(2)), ("3", 54, 1.0)]),
        ("lcn", {"bias": True}, [("0", 9, 1.0)]),
        ("lcn", {"hidden": [2]}, [("0", 9, math.sqrt(2)), ("3", 18, 1.0)]),
        ("convlcn", {"bias": True}, [("0", 9, math.sqrt(2)), ("1", 3, 1.0)]),
        ("mlp", {"bias": True}, [("1", 4096, 1.0)]),
        ("mlp", {"hidden": [64]}, [("1", 4096, math.sqrt(2)), ("3", 64, 1.0)]),
        ("condconv", {"bias": True}, [("0", 9, 1.0)]),
    ],
)
def test_reference_init_bounds_and_zero_biases(name, options, layers):
    torch.manual_seed(9)
    model = BASELINES[name](1, 64, 64, **options)
    params = dict(model.named_parameters())
    for prefix, fan_in, gain in layers:
        weight = params[f"{prefix}.weight"].detach()
        limit = bound(fan_in, gain)
        assert weight.abs().max() <= limit
        if weight.numel() >= 1000:  # enough draws to fill the range and give its variance
            assert weight.abs().max() > 0.98 * limit
            assert weight.std() == pytest.approx(limit / math.sqrt(3), rel=0.05)
        if f"{prefix}.bias" in params:
            assert torch.count_nonzero(params[f"{prefix}.bias"]) == 0
    if name == "condconv":
        route = model[0].route
        assert route.weight.abs().max() <= bound(1, 1.0)
        assert torch.count_nonzero(route.bias) == 0


def test_pytorch_init_keeps_the_layer_defaults():
    torch.manual_seed(10)
    model = BASELINES["lcn"](1, 64, 64, bias=True, init="pytorch")
    weight, bias = model[0].weight.detach(), model[0].bias.detach()
    limit = 1 / math.sqrt(9)  # LocallyConnected2d's own default, as nn.Conv2d's
    assert limit * 0.98 < weight.abs().max() <= limit
    assert torch.count_nonzero(bias) == bias.numel()
    torch.manual_seed(10)
    cnn = BASELINES["cnn"](1, 8, 10, bias=True, init="pytorch")
    torch.manual_seed(10)
    plain = [torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 1, 3, padding=1)]
    torch.testing.assert_close(cnn[0].weight, plain[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(cnn[3].bias, plain[1].bias, rtol=0, atol=0)


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
    weight = coord[0].weight
    assert weight.shape == (1, 3, 3, 3) and coord[0].in_channels == 3
    rows = torch.linspace(-1, 1, 8).view(8, 1).expand(8, 10)
    cols = torch.linspace(-1, 1, 10).view(1, 10).expand(8, 10)
    grid_input = torch.stack([torch.zeros(8, 10), rows, cols]).unsqueeze(0)
    expected = F.conv2d(grid_input, weight, padding=1)
    torch.testing.assert_close(coord(torch.zeros(1, 1, 8, 10)), expected)
    # with coords: first, only the first conv sees them (the former construction)
    first = BASELINES["coordconv"](1, 8, 10, hidden=[4], coords="first")
    convs = [m for m in first.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.in_channels for c in convs] == [3, 4]
    every = BASELINES["coordconv"](1, 8, 10, hidden=[4])
    convs = [m for m in every.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.in_channels for c in convs] == [3, 6]


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
        ("convlcn", {"lcn_kernel_size": 2}),
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


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("cnn", {"init": "xavier"}, "unknown init 'xavier'; valid: reference, pytorch"),
        ("mlp", {"init": "xavier"}, "unknown init 'xavier'"),
        ("convlcn", {"init": "xavier"}, "unknown init 'xavier'"),
        ("coordconv", {"coords": "last"}, "unknown coords 'last'; valid: every, first"),
    ],
)
def test_bad_choices_are_named(name, options, message):
    with pytest.raises(ValueError, match=message):
        BASELINES[name](1, 8, 10, **options)


@pytest.mark.parametrize("bias", [False, True])
def test_coordconv_layers_split_sums_are_the_concatenated_convolutions(bias):
    """The coordinate channels' share is one image's convolution broadcast over the batch:
    values and every gradient as the convolution of the concatenated input, within float32
    rounding, in training (autograd) and evaluation alike."""
    torch.manual_seed(3)
    layer = CoordConv2d(4, 3, 3, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(4.0)  # coordinates' weights large enough to matter
    x = torch.randn(16, 4, 20, 24, requires_grad=True)
    grad_out = torch.randn(16, 3, 20, 24)
    out = layer(x)
    assert out.grad_fn is not None and "DirectConv" not in out.grad_fn.name()  # the sum's
    out.backward(grad_out)
    ours = (out.detach(), x.grad.clone(), layer.weight.grad.clone())

    def concatenated(x, dtype):
        x = x.detach().to(dtype).requires_grad_(True)
        weight = layer.weight.detach().to(dtype).requires_grad_(True)
        bias = None if layer.bias is None else layer.bias.detach().to(dtype)
        out = F.conv2d(with_coordinates(x), weight, bias, padding=1)
        out.backward(grad_out.to(dtype))
        return [t.double() for t in (out.detach(), x.grad, weight.grad)]

    onednn, exact = concatenated(x, torch.float32), concatenated(x, torch.float64)
    for value, theirs, reference in zip(ours, onednn, exact, strict=True):
        error = (value.double() - reference).abs().max().item()
        ulps = 4e-7 * reference.abs().max().item()  # whatever oneDNN's kernel on this CPU
        assert error <= max(1.5 * (theirs - reference).abs().max().item(), ulps) + 1e-6
    assert ours[2][:, 4:].abs().max() > 10  # the coordinates' weights got their gradient
    with torch.no_grad():
        assert torch.equal(layer(x), ours[0])
