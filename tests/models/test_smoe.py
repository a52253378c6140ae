"""SMoE layers and networks: gates, auxiliary losses, the registry, learning the stencils."""

import math

import pytest
import torch

from smoe.core.errors import InputError
from smoe.core.metrics import parameter_count
from smoe.families.heat.mask import generate_mask
from smoe.families.heat.names import GATE_NAMES, MODEL_KINDS
from smoe.families.heat.reference import reference_stencil
from smoe.families.heat.registry import MODELS, build_model
from smoe.nn.gates import GATES, build_gate
from smoe.nn.layer import SMoENet, auxiliary_loss, smoe_layers

MASK = torch.as_tensor(generate_mask(8, 9, 3, seed=1))


def test_names_module_matches_the_registries():
    assert sorted(MODEL_KINDS) == sorted(MODELS)
    assert list(GATE_NAMES) == list(GATES)


def test_paper_heat_model_has_12315_parameters():
    mask = torch.as_tensor(generate_mask(64, 64, 3, seed=42))
    model = build_model(
        "smoe",
        {"gate": "latent", "experts": 3, "k": 1, "rc_loss": True, "damping": True, "quantile": 0.3},
        1,
        64,
        64,
        mask=mask,
    )
    assert parameter_count(model) == 12_315  # 3 experts x 9 weights + a 3 x 64 x 64 gate


def test_latent_gate_starts_in_the_paper_range():
    gate = build_gate("latent", 1, 3, 1, 64, 64)
    bound = math.sqrt(3 * 3 / 1)
    assert gate.logits.abs().max() <= bound and gate.logits.abs().max() > 0.9 * bound
    assert gate.skip_init
    small = build_gate("latent", 1, 3, 1, 8, 8, init_scale=0.01)
    assert small.logits.abs().max() <= 0.01


@pytest.mark.parametrize("gate", GATE_NAMES)
@pytest.mark.parametrize("rc_loss", [False, True])
def test_every_gate_routes_and_trains(gate, rc_loss):
    torch.manual_seed(0)
    model = SMoENet(2, 8, 9, mask=MASK, gate=gate, experts=3, k=1, rc_loss=rc_loss, damping=True)
    x = torch.randn(4, 2, 8, 9)
    out = model(x)
    assert out.shape == (4, 1, 8, 9)
    (out - torch.randn_like(out)).pow(2).mean().backward()
    gate_params = list(model.final.gate.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gate_params)
    if gate != "fixed":
        assert any(p.grad.abs().sum() > 0 for p in gate_params)
    assert model.final.experts.weight.grad.abs().sum() > 0
    assert model.final.last_selection.shape == (4, 1, 8, 9)


def test_fixed_gate_routes_by_the_region_map():
    model = SMoENet(1, 8, 9, mask=MASK, gate="fixed", experts=3, k=1)
    with torch.no_grad():
        for e, a in enumerate((0.0025, 0.025, 0.25)):
            model.final.experts.weight[e, 0] = torch.from_numpy(reference_stencil(a)).float()
    x = torch.rand(2, 1, 8, 9)
    out = model(x)
    assert torch.equal(model.final.last_selection[:, 0], MASK.expand(2, -1, -1))
    for e, a in enumerate((0.0025, 0.025, 0.25)):
        kernel = torch.from_numpy(reference_stencil(a)).float()[None, None]
        expected = torch.nn.functional.conv2d(x, kernel, padding=1)
        torch.testing.assert_close(out[:, :, MASK == e], expected[:, :, MASK == e])


def test_mask_input_feeds_the_region_map_to_the_gate():
    model = SMoENet(1, 8, 9, mask=MASK, gate="conv1", mask_input=True)
    assert model.final.gate.net.in_channels == 2
    assert model(torch.rand(2, 1, 8, 9)).shape == (2, 1, 8, 9)


def test_hidden_layers_concatenate_and_the_final_layer_sums():
    model = SMoENet(
        1,
        8,
        9,
        mask=MASK,
        hidden_layers=[{"experts": 4, "k": 2, "filters": 3}],
        experts=3,
        k=2,
        weighted=True,
    )
    assert [layer.out_channels for layer in model.layers] == [6, 1]
    assert model.layers[1].experts.in_channels == 6
    assert model(torch.rand(2, 1, 8, 9)).shape == (2, 1, 8, 9)


def test_auxiliary_losses_per_layer_and_summed():
    torch.manual_seed(0)
    model = SMoENet(
        1,
        8,
        9,
        mask=MASK,
        hidden_layers=[{"experts": 4}],
        experts=3,
        k=1,
        noise=True,
        aux={"importance": 0.1, "load": 0.2, "spatial": 0.3, "load_shazeer": 0.4},
    )
    model(torch.rand(2, 1, 8, 9))
    per_layer = [layer.aux_losses for layer in smoe_layers(model)]
    expected = {"importance", "load", "spatial", "load_shazeer"}
    assert [set(losses) for losses in per_layer] == [expected, expected]
    total = sum(v for losses in per_layer for v in losses.values())
    torch.testing.assert_close(auxiliary_loss(model), total)
    model.eval()
    model(torch.rand(2, 1, 8, 9))
    assert auxiliary_loss(model) is None  # the gate's losses are training signals only


def _cv2(values):
    values = values.double().flatten()
    mean = values.mean()
    std = ((values - mean) ** 2).sum().div(values.numel() - 1).sqrt()
    return float((std / mean) ** 2)


def test_auxiliary_losses_follow_the_reference_formulas():
    """Written out by hand: importance and load are CV^2 (unbiased std) of the routing weights
    summed over batch and space / of the selection probability summed over the batch only;
    spatial agreement is the std over the batch per expert and point, averaged over points
    and summed over experts."""
    torch.manual_seed(1)
    coefficients = {"importance": 0.5, "load": 2.0, "spatial": 3.0, "smoothness": 1.0}
    model = SMoENet(
        1, 6, 7, gate="conv", experts=3, k=1, noise=True, activation="sigmoid", aux=coefficients
    )
    x = torch.rand(4, 1, 6, 7)
    layer = model.final
    torch.manual_seed(5)
    model(x)
    losses = {name: float(value.detach()) for name, value in layer.aux_losses.items()}
    # the same forward again, by hand, with the same noise draw
    weights = torch.sigmoid(layer.gate(x, None)).detach().double()
    torch.manual_seed(5)
    noisy = weights + torch.randn_like(weights.float()).double() / 3
    assert losses["importance"] == pytest.approx(0.5 * _cv2(weights.sum(dim=(0, 2, 3))), rel=1e-5)
    spatial = weights.std(dim=0).mean(dim=(1, 2)).sum()
    assert losses["spatial"] == pytest.approx(3.0 * float(spatial), rel=1e-5)
    threshold = noisy.max(dim=1, keepdim=True).values
    p_selected = 1 - torch.distributions.Normal(0.0, 1 / 3).cdf(threshold - weights)
    assert losses["load"] == pytest.approx(2.0 * _cv2(p_selected.sum(dim=0)), rel=1e-4)
    assert losses["smoothness"] > 0


def test_spatial_agreement_is_zero_for_a_latent_gate_and_importance_zero_when_balanced():
    model = SMoENet(
        1,
        8,
        9,
        mask=MASK,
        gate="latent",
        experts=3,
        k=1,
        softmax=True,
        aux={"importance": 1.0, "spatial": 1.0},
    )
    model(torch.rand(2, 1, 8, 9))
    # a latent gate routes every sample alike: full agreement across the batch
    assert model.final.aux_losses["spatial"].item() == 0.0
    with torch.no_grad():
        model.final.gate.logits.zero_()
    model(torch.rand(2, 1, 8, 9))
    assert model.final.aux_losses["importance"].item() == pytest.approx(0.0, abs=1e-9)
    with torch.no_grad():
        model.final.gate.logits[0] = 5.0
    model(torch.rand(2, 1, 8, 9))
    assert model.final.aux_losses["importance"].item() > 0.5


def test_no_auxiliary_losses_by_default():
    model = SMoENet(1, 8, 9, mask=MASK)
    model(torch.rand(1, 1, 8, 9))
    assert auxiliary_loss(model) is None


@pytest.mark.parametrize(
    "kind, options, message",
    [
        ("transformer", {}, "unknown model kind 'transformer'; known kinds: cnn"),
        ("smoe", {"gate": "attention"}, "unknown gate 'attention'; known gates: latent"),
        ("smoe", {"experts": 3, "k": 4}, "k=4 must be between 1 and experts=3"),
        ("smoe", {"aux": {"balance": 1.0}}, "unknown auxiliary losses"),
        ("smoe", {"aux": {"load": 1.0}}, "load loss needs noise"),
        ("smoe", {"filters": 2}, "final SMoE layer must give 1 channel"),
        ("smoe", {"expertz": 3}, "bad option"),
        ("cnn", {"hiden": [3]}, "bad option"),
        ("cnn", {"activation": "swish"}, "unknown activation 'swish'"),
        ("smoe", {"gate": "latent", "gate_options": {"depth": 2}}, "gate 'latent': unknown option"),
    ],
)
def test_bad_model_configuration_is_named(kind, options, message):
    with pytest.raises(InputError, match=message):
        build_model(kind, options, 1, 8, 9, mask=MASK, name="m")


def test_fixed_gate_needs_enough_experts():
    with pytest.raises(InputError, match="3 region types but only 2 experts"):
        build_model("smoe", {"gate": "fixed", "experts": 2}, 1, 8, 9, mask=MASK)


def test_smoe_with_oracle_gate_learns_the_three_stencils():
    torch.manual_seed(0)
    diffusivity = (0.0025, 0.025, 0.25)
    a = torch.tensor(diffusivity)[MASK]
    x = torch.rand(64, 1, 8, 9)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    neighbours = (
        padded[..., :-2, 1:-1]
        + padded[..., 2:, 1:-1]
        + padded[..., 1:-1, :-2]
        + padded[..., 1:-1, 2:]
    )
    y = x + a * (neighbours - 4 * x)
    model = SMoENet(1, 8, 9, mask=MASK, gate="fixed", experts=3, k=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(400):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    kernels = model.final.expert_kernels()[:, 0, 0]
    for e, value in enumerate(diffusivity):
        stencil = torch.from_numpy(reference_stencil(value)).float()
        assert (kernels[e] - stencil).abs().max() < 1e-3


@pytest.mark.parametrize("gate", ["conv", "conv1", "coordconv", "coordconv-multi", "linear", "lcn"])
def test_gates_have_no_bias_unless_asked_as_in_the_reference(gate):
    def biases(gate_options=None):
        net = SMoENet(1, 8, 9, gate=gate, experts=3, k=1, gate_options=gate_options).final.gate
        return [
            name
            for name, _ in net.named_parameters()
            if name.endswith("bias") and not _is_batchnorm(net, name)
        ]

    assert biases() == []
    assert biases({"bias": True})


def _is_batchnorm(gate, parameter_name):
    module = gate.get_submodule(parameter_name.rsplit(".", 1)[0])
    return isinstance(module, torch.nn.BatchNorm2d)


def test_coordconv_multi_gate_is_experts_wide_as_in_the_reference():
    gate = SMoENet(1, 8, 9, gate="coordconv-multi", experts=4, k=1).final.gate
    convs = [m for m in gate.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 4), (4, 4), (4, 4)]


@pytest.mark.parametrize(
    "expert_init, final_bound, hidden_bound",
    [("reference", (3 / 9) ** 0.5, (6 / 9) ** 0.5), ("pytorch", 1 / 3, 1 / 3)],
)
def test_expert_initialisation_bounds(expert_init, final_bound, hidden_bound):
    """The reference draws Kaiming-uniform with gain 1 for the final layer (bound 0.577 for
    one 3x3 input channel) and the ReLU gain for hidden layers; PyTorch's own is 1/3."""
    torch.manual_seed(0)
    hidden = SMoENet(
        1, 4, 4, hidden_layers=[{"experts": 300}], experts=3, k=1, expert_init=expert_init
    )
    final = SMoENet(1, 4, 4, experts=3000, k=1, expert_init=expert_init)
    for layer, bound in ((hidden.layers[0], hidden_bound), (final.final, final_bound)):
        weight = layer.experts.weight
        assert weight.abs().max() <= bound
        assert weight.abs().max() > 0.99 * bound  # thousands of draws reach the bound
