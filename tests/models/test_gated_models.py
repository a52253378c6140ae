"""The gated family's models against the official code's definitions (moe-families.md part B):
forward passes and losses by hand, gate gradients of every variant, the expert bank against
separate experts, the regularisers' normalisation, the distilled student and the single
baseline."""

import math

import pytest
import torch
import torch.nn.functional as F

from smoe.core.errors import InputError
from smoe.families.gated.models import (
    EPS,
    AttentiveTrunk,
    Expert,
    ExpertBank,
    Gate,
    GatedMoE,
    SingleModel,
    conv_pool_relu,
    cross_entropy,
    distill_gate,
    gated_loss,
    importance_loss,
    moe_parameter_count,
    parameter_count,
    sample_similarity_loss,
    topk_mask,
    trainable_parameters,
)

SHAPES = [((8, 8), 9), ((1, 28, 28), 169)]
VARIANTS = [("expectation", 1), ("stochastic", 1), ("topk", 1), ("topk", 2), ("em", 1)]


@pytest.mark.parametrize(("shape", "flat"), SHAPES)
def test_mnist_expert_and_gate_shapes(shape, flat):
    x = torch.randn(5, *shape)
    expert = Expert(shape, 10)
    assert expert.fc1.in_features == flat and expert.fc1.out_features == 5
    probs, h = expert(x)
    assert probs.shape == (5, 10) and h.shape == (5, 32)
    torch.testing.assert_close(probs.sum(1), torch.ones(5))  # probabilities, not logits
    gate = Gate(shape, 4)
    assert gate.fc1.in_features == flat and gate.fc1.out_features == 128
    assert gate(x).shape == (5, 4)
    trunk = AttentiveTrunk(shape)
    assert trunk(x).shape == (5, 32) and not hasattr(trunk, "out")


def test_cifar_networks_are_the_published_ones():
    """Expert convs 4, 8, 16, 16 (batch norm after the 2nd and 4th, which have no bias) ->
    64 features -> 64 -> 32 -> 10; gate 64, 128, 256, 256 -> 1024 -> 512 -> 32 -> E."""
    expert = Expert((3, 32, 32), 10, "cifar10")
    assert [c.out_channels for c in expert.trunk.convs] == [4, 8, 16, 16]
    assert [c.bias is None for c in expert.trunk.convs] == [False, True, False, True]
    assert sorted(expert.trunk.norms) == ["1", "3"]
    assert expert.trunk.out_features == 64
    assert (expert.fc1.in_features, expert.fc1.out_features, expert.fc2.out_features) == (
        64,
        64,
        32,
    )
    gate = Gate((3, 32, 32), 10, "cifar10")
    assert [c.out_channels for c in gate.trunk.convs] == [64, 128, 256, 256]
    assert gate.trunk.out_features == 1024 and gate.fc1.out_features == 512
    probs, h = expert(torch.randn(4, 3, 32, 32))
    assert probs.shape == (4, 10) and h.shape == (4, 32)
    assert AttentiveTrunk((3, 32, 32), "cifar10")(torch.randn(2, 3, 32, 32)).shape == (2, 32)


@pytest.mark.parametrize(
    ("shape", "architecture"), [((1, 28, 28), "mnist"), ((8, 8), "mnist"), ((3, 32, 32), "cifar10")]
)
def test_the_expert_bank_computes_and_starts_as_separate_experts(shape, architecture):
    """The bank draws E experts' initial weights in order and computes each expert's output
    (batch norm included, in training mode) as that expert alone would."""
    torch.manual_seed(3)
    bank = ExpertBank(shape, 10, 3, architecture)
    torch.manual_seed(3)
    separate = [Expert(shape, 10, architecture) for _ in range(3)]
    x = torch.randn(6, *shape)
    probs, hidden = bank(x)
    for e, expert in enumerate(separate):
        state = bank.expert_state(e)
        for key, value in expert.state_dict().items():
            if "running" not in key and "num_batches" not in key:
                torch.testing.assert_close(state[key], value)
        p, h = expert(x)
        torch.testing.assert_close(probs[:, e], p, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(hidden[:, e], h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels", [1, 2])
def test_the_compiled_trunk_equals_conv_relu_pool(channels):
    """The MNIST trunk's fast path (a matrix product, a compiled pooling and a compiled
    filter gradient) against conv2d -> ReLU -> max_pool2d, values and gradients."""
    torch.manual_seed(0)
    x = torch.randn(16, channels, 28, 28)
    weight = torch.randn(3, channels, 3, 3, requires_grad=True)
    bias = torch.randn(3, requires_grad=True)
    fast = conv_pool_relu(x, weight, bias)
    plain = F.max_pool2d(F.relu(F.conv2d(x, weight, bias)), 2).flatten(2).transpose(0, 1)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(fast)
    for ours, theirs in zip(
        torch.autograd.grad(fast, (weight, bias), g),
        torch.autograd.grad(plain, (weight, bias), g),
        strict=True,
    ):
        torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-5)
    # float64 (or an input that needs its gradient) takes the plain torch path, exactly
    x64 = x.double().requires_grad_()
    w64, b64 = weight.detach().double(), bias.detach().double()
    torch.testing.assert_close(
        conv_pool_relu(x64, w64, b64),
        F.max_pool2d(F.relu(F.conv2d(x64, w64, b64)), 2).flatten(2).transpose(0, 1),
    )


@pytest.mark.parametrize(("variant", "k"), VARIANTS)
@pytest.mark.parametrize("attentive", [False, True])
def test_every_variant_trains_its_gate(variant, k, attentive):
    """A non-zero gate gradient for every variant, top-1 included (masking the logits
    before the softmax would make p one-hot and the gate's gradient exactly 0)."""
    torch.manual_seed(0)
    model = GatedMoE((1, 28, 28), 10, experts=4, variant=variant, top_k=k, attentive=attentive)
    x, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    out = model(x)
    assert out["expert_probs"].shape == (16, 4, 10) and out["weights"].shape == (16, 4)
    assert out["output"].shape == (16, 10) and out["choice"].shape == (16,)
    loss = gated_loss(out, labels)
    assert torch.isfinite(loss)
    loss.backward()
    gate_parameters = list(model.gate.parameters())
    if attentive:
        gate_parameters += list(model.query.parameters()) + list(model.key.parameters())
    gate_norm = sum(float(p.grad.norm()) for p in gate_parameters if p.grad is not None)
    assert gate_norm > 1e-8
    expert_norm = sum(float(p.grad.norm()) for p in model.experts.parameters())
    assert expert_norm > 1e-8


def _fixed(variant, k, experts_probs, scores):
    """A model whose forward is fed fixed expert probabilities and gate scores."""
    model = GatedMoE((8, 8), 3, experts=experts_probs.shape[1], variant=variant, top_k=k)
    model.experts.forward = lambda x: (experts_probs, torch.zeros(*experts_probs.shape[:2], 32))
    model.gate.forward = lambda x: scores
    return model


Y = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]])  # [1, E=3, C=3]
Z = torch.tensor([[1.0, 2.0, 0.5]])


def test_top1_forward_by_hand():
    """p = softmax over all scores; e* = argmax; o = softmax(p_e* y_e*)."""
    model = _fixed("topk", 1, Y, Z)
    out = model(torch.zeros(1, 8, 8))
    p = torch.softmax(Z, dim=1)
    assert int(out["choice"]) == 1
    torch.testing.assert_close(out["weights"], p)
    expected = torch.softmax(p[0, 1] * Y[0, 1], dim=0)
    torch.testing.assert_close(out["output"][0], expected)
    loss = gated_loss(out, torch.tensor([1]))
    torch.testing.assert_close(loss, -torch.log(expected[1] + EPS))


def test_top2_forward_by_hand():
    """Scores outside the top 2 set to -inf, softmax renormalised over the top 2, o = sum of
    p~_e y_e without a further softmax."""
    model = _fixed("topk", 2, Y, Z)
    out = model(torch.zeros(1, 8, 8))
    top = torch.exp(torch.tensor([1.0, 2.0]))
    p = torch.cat([top / top.sum(), torch.zeros(1)])
    torch.testing.assert_close(out["weights"][0], p)
    expected = p[0] * Y[0, 0] + p[1] * Y[0, 1]
    torch.testing.assert_close(out["output"][0], expected)
    torch.testing.assert_close(gated_loss(out, torch.tensor([0])), -torch.log(expected[0] + EPS))


def test_expectation_takes_a_softmax_over_the_mixture():
    model = _fixed("expectation", 1, Y, Z)
    out = model(torch.zeros(1, 8, 8))
    p = torch.softmax(Z, dim=1)[0]
    expected = torch.softmax((p[:, None] * Y[0]).sum(0), dim=0)
    torch.testing.assert_close(out["output"][0], expected)
    torch.testing.assert_close(gated_loss(out, torch.tensor([2])), -torch.log(expected[2] + EPS))


def test_stochastic_loss_by_hand_and_its_routes():
    model = _fixed("stochastic", 1, Y, Z)
    model.eval()
    out = model(torch.zeros(1, 8, 8))
    p = torch.softmax(Z, dim=1)[0]
    ce = -torch.log(Y[0, :, 0] + EPS)
    expected = -torch.log((p * torch.exp(-0.5 * ce)).sum() + EPS)
    torch.testing.assert_close(gated_loss(out, torch.tensor([0])), expected)
    assert int(out["choice"]) == 1  # evaluation: the argmax expert
    torch.testing.assert_close(out["output"][0], Y[0, 1])
    model.train()
    model.generator = torch.Generator().manual_seed(0)
    many = _fixed("stochastic", 1, Y.expand(4000, 3, 3), Z.expand(4000, 3))
    many.generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(many(torch.zeros(4000, 8, 8))["choice"], minlength=3).float()
    torch.testing.assert_close(counts / 4000, p, atol=0.03, rtol=0)


def test_em_loss_routes_through_the_posterior_argmax_expert():
    model = _fixed("em", 1, Y, Z)
    out = model(torch.zeros(1, 8, 8))
    p = torch.softmax(Z, dim=1)[0]
    target = int((p * Y[0, :, 0]).argmax())
    expected = -torch.log(Y[0, target, 0] + EPS) - torch.log(p[target] + EPS)
    torch.testing.assert_close(gated_loss(out, torch.tensor([0])), expected)


@pytest.mark.parametrize("k", [1, 2])
def test_topk_masks_exactly(k):
    scores = torch.tensor([[0.3, 0.1, 0.9, 0.5]])
    masked = topk_mask(scores, k)
    assert int(torch.isfinite(masked).sum()) == k
    assert float(masked[0, 2]) == pytest.approx(0.9)


def test_attentive_scores_by_hand():
    torch.manual_seed(1)
    model = GatedMoE((8, 8), 10, experts=3, attentive=True)
    x = torch.randn(2, 8, 8)
    _, hidden = model.experts(x)
    q = model.query(model.gate(x))
    k = model.key(hidden)
    expected = (q.unsqueeze(1) * k).sum(-1) / math.sqrt(32)
    torch.testing.assert_close(model(x)["scores"], expected)
    # the attentive trunk ends without a ReLU: some query inputs are negative
    assert (model.gate(torch.randn(64, 8, 8)) < 0).any()


def test_temperature_divides_the_scores():
    torch.manual_seed(0)
    a = GatedMoE((8, 8), 10, experts=3, temperature=1.0)
    b = GatedMoE((8, 8), 10, experts=3, temperature=2.0)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 8, 8)
    torch.testing.assert_close(b(x)["scores"] * 2, a(x)["scores"])


def test_importance_loss_by_hand():
    weights = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    importance = torch.tensor([0.7, 0.8, 0.5])
    expected = 0.2 * importance.var(unbiased=True) / importance.mean() ** 2
    torch.testing.assert_close(importance_loss(weights, 0.2), expected)


def test_similarity_loss_with_the_published_normalisation_by_hand():
    """L_s = beta_s * sum_e (1/E) sum_ab p_e(a)p_e(b)D_ab - beta_d * (sum_{e!=e'}
    1/(E^2-E) sum_ab p_e(a)p_e'(b)D_ab) / B^2, D the pixel distances over their maximum."""
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])  # distances 5, 10, 5
    weights = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    d = torch.tensor([[0.0, 0.5, 1.0], [0.5, 0.0, 0.5], [1.0, 0.5, 0.0]])
    same, diff = 0.0, 0.0
    for e in range(2):
        for f in range(2):
            total = sum(
                float(weights[a, e] * weights[b, f] * d[a, b]) for a in range(3) for b in range(3)
            )
            if e == f:
                same += total / 2
            else:
                diff += total / 2
    assert (same, diff) == pytest.approx((0.5, 1.5))  # worked out on paper
    expected = 1e-5 * 0.5 - 1e-2 * 1.5 / 9  # only the second term is divided by B^2 = 9
    assert float(sample_similarity_loss(weights, x, 1e-5, 1e-2)) == pytest.approx(expected)
    given = sample_similarity_loss(weights, x, 1.0, 0.0, distances=d * 2)
    assert float(given) == pytest.approx(2 * same)


def test_distilled_student_copies_the_teachers_experts_and_gate_trunk():
    torch.manual_seed(0)
    teacher = GatedMoE((1, 28, 28), 10, experts=3, attentive=True, variant="expectation")
    torch.manual_seed(7)
    student = distill_gate(teacher)
    assert not student.attentive and not hasattr(student, "query")
    for key, value in teacher.experts.state_dict().items():
        assert torch.equal(student.experts.state_dict()[key], value)
    for part in ("trunk", "fc1", "fc2"):
        for key, value in getattr(teacher.gate, part).state_dict().items():
            assert torch.equal(getattr(student.gate, part).state_dict()[key], value)
    assert student.gate.out.out_features == 3
    assert all(not p.requires_grad for p in student.experts.parameters())
    assert {id(p) for p in trainable_parameters(student)} == {
        id(p) for p in student.gate.parameters()
    }


def test_single_is_exactly_one_expert_and_the_mixture_sized_one_matches_the_moe():
    single = SingleModel((1, 28, 28), 10)
    expert = Expert((1, 28, 28), 10)
    assert parameter_count(single) == parameter_count(expert)
    # one expert: conv 10 + FC 169*5+5 + 5*32+32 + 32*10+10
    assert parameter_count(single) == 10 + 850 + 192 + 330
    budget = moe_parameter_count((1, 28, 28), 10, experts=10)
    wide = SingleModel((1, 28, 28), 10, params_budget=budget)
    assert abs(parameter_count(wide) - budget) <= 169 + 1 + 32
    assert wide.mixture_sized and not single.mixture_sized
    probs = single(torch.randn(3, 1, 28, 28))
    torch.testing.assert_close(probs.sum(1), torch.ones(3))


def test_cross_entropy_is_the_codes():
    probs = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    expected = -(math.log(0.75 + EPS) + math.log(0.0 + EPS)) / 2
    assert float(cross_entropy(probs, torch.tensor([1, 1]))) == pytest.approx(expected)


def test_bad_options_name_the_option():
    with pytest.raises(InputError, match="top_k"):
        GatedMoE((8, 8), 10, experts=2, variant="topk", top_k=3)
    with pytest.raises(InputError, match="variant"):
        GatedMoE((8, 8), 10, variant="switch")
    with pytest.raises(InputError, match="temperature"):
        GatedMoE((8, 8), 10, temperature=0)
    with pytest.raises(InputError, match="experts"):
        GatedMoE((8, 8), 10, experts=0)
    with pytest.raises(InputError, match="in_shape"):
        Expert((8,), 10)
    with pytest.raises(InputError, match="architecture"):
        Expert((1, 28, 28), 10, "resnet")
    with pytest.raises(InputError, match="too small"):
        Expert((3, 8, 8), 10, "cifar10")


def test_expectation_moe_learns_sklearn_digits():
    """E = 4, expectation, Adam lr 1e-2, batch 128, 25 epochs on 1400 digits; chance is 10 %
    (measured 0.80 at seed 0: the softmax over the mixture's probabilities damps the
    gradient, so the model learns slower than with the log-likelihood of the mixture)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = GatedMoE((1, 8, 8), 10, experts=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(25):
        for start in range(0, len(train), 128):
            batch = train[start : start + 128]
            loss = gated_loss(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(x[test])
    accuracy = (out["output"].argmax(1) == y[test]).float().mean().item()
    assert accuracy > 0.6
