"""Training-mode batch norm as compiled loops: PyTorch's values within its own float32
error (measured against float64), its running statistics and its evaluation pass."""

import pytest
import torch
from torch import nn

from smoe.core import compiled
from smoe.nn.batchnorm import DirectBatchNorm2d


def layers(channels=4, **options):
    torch.manual_seed(0)
    ours = DirectBatchNorm2d(channels, **options)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2.0)
        ours.bias.uniform_(-1.0, 1.0)
    theirs = nn.BatchNorm2d(channels, **options)
    theirs.load_state_dict(ours.state_dict())
    exact = nn.BatchNorm2d(channels, **options).double()
    exact.load_state_dict(ours.state_dict())
    return ours, theirs, exact


def train_step(layer, x, grad_out, dtype):
    x = x.detach().to(dtype).clone().requires_grad_(True)
    out = layer(x)
    out.backward(grad_out.to(dtype))
    values = {"out": out.detach(), "input": x.grad, "weight": layer.weight.grad}
    values["bias"] = layer.bias.grad
    if layer.running_mean is not None:
        values["running_mean"] = layer.running_mean.clone()
        values["running_var"] = layer.running_var.clone()
    return {name: value.double() for name, value in values.items()}


@pytest.mark.parametrize("options", [{}, {"momentum": None}, {"track_running_stats": False}])
@pytest.mark.parametrize("shape", [(32, 4, 64, 64), (5, 3, 7, 9)])
def test_values_gradients_and_running_stats_are_torchs_within_its_rounding(shape, options):
    ours, theirs, exact = layers(shape[1], **options)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # the second step starts from updated running statistics
        x = torch.randn(shape, generator=g) * 3.0 + 1.0
        grad_out = torch.randn(shape, generator=g)
        values = train_step(ours, x, grad_out, torch.float32)
        onednn = train_step(theirs, x, grad_out, torch.float32)
        reference = train_step(exact, x, grad_out, torch.float64)
        assert values.keys() == reference.keys()
        for name, value in values.items():
            error = (value - reference[name]).abs().max().item()
            torchs = (onednn[name] - reference[name]).abs().max().item()
            ulps = 3 * 2.0**-23 * reference[name].abs().max().item()  # of the largest value
            assert error <= 2.0 * torchs + ulps, name
        for layer in (ours, theirs, exact):
            layer.zero_grad()
    assert values["input"].abs().max() > 0.5 and values["weight"].abs().max() > 1
    if ours.track_running_stats:
        assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)


def test_the_training_pass_is_the_compiled_one_and_evaluation_torchs():
    ours, theirs, _ = layers()
    x = torch.randn(8, 4, 6, 6, requires_grad=True)
    assert ours(x).grad_fn.name() == "_BatchNormTrainingBackward"
    assert theirs(x).grad_fn.name() != "_BatchNormTrainingBackward"
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.running_var.copy_(theirs.running_var)  # evaluation on the same statistics
    ours.running_mean.copy_(theirs.running_mean)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def test_other_passes_run_torchs_batch_norm(monkeypatch):
    ours, theirs, _ = layers()
    x = torch.randn(8, 4, 6, 6)
    assert not ours._fast_path(x.double())
    assert not ours._fast_path(torch.randn(1, 4, 1, 1))
    monkeypatch.setattr(compiled, "available", lambda: False)
    assert torch.equal(ours(x), theirs(x))
    assert torch.equal(ours.running_var, theirs.running_var)
