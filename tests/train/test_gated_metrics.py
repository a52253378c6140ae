import math

import numpy as np
import pytest
import torch

from smoe.families.gated.metrics import (
    accuracy,
    entropy_bits,
    mutual_information,
    per_task_entropy,
    routing_matrix,
    sample_entropy,
    usage_entropy,
)


def test_accuracy_of_log_probabilities():
    log_probs = torch.log(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]))
    assert accuracy(log_probs, torch.tensor([0, 1, 1])) == pytest.approx(100 * 2 / 3)


def test_uniform_gate_entropies_are_log2_e():
    p = torch.full((6, 4), 0.25)
    assert sample_entropy(p) == pytest.approx(2.0)
    assert usage_entropy(p) == pytest.approx(2.0)
    assert per_task_entropy(p, [0, 0, 1, 1, 2, 2]) == pytest.approx(2.0)


def test_one_hot_gate_entropies():
    p = torch.eye(4)[[0, 1, 2, 3, 0, 1, 2, 3]]
    assert sample_entropy(p) == pytest.approx(0.0)
    assert usage_entropy(p) == pytest.approx(2.0)
    # each class always to one expert
    assert per_task_entropy(p, [0, 1, 2, 3, 0, 1, 2, 3]) == pytest.approx(0.0)
    # each class split evenly over two experts: 1 bit
    assert per_task_entropy(p, [0, 0, 1, 1, 0, 0, 1, 1]) == pytest.approx(1.0)
    assert usage_entropy(torch.eye(3)[[1, 1, 1]]) == pytest.approx(0.0)


def test_sample_entropy_by_hand():
    p = np.array([[0.5, 0.5, 0.0], [0.5, 0.25, 0.25]])
    assert sample_entropy(p) == pytest.approx((1.0 + 1.5) / 2)
    # mean p = [0.5, 0.375, 0.125]
    expected = -(0.5 * math.log2(0.5) + 0.375 * math.log2(0.375) + 0.125 * math.log2(0.125))
    assert usage_entropy(p) == pytest.approx(expected)


def test_mutual_information_two_by_two_by_hand():
    # joint counts [[3, 1], [1, 3]] -> joint [[3/8, 1/8], [1/8, 3/8]], marginals 1/2
    choice = [0, 0, 0, 0, 1, 1, 1, 1]
    predicted = [0, 0, 0, 1, 0, 1, 1, 1]
    expected = 1.0 - (-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    assert mutual_information(choice, predicted, 2, 2) == pytest.approx(expected)
    assert mutual_information([0, 1, 0, 1], [0, 1, 0, 1], 2, 2) == pytest.approx(1.0)
    assert mutual_information([0, 0, 1, 1], [0, 1, 0, 1], 2, 2) == pytest.approx(0.0)
    assert mutual_information([0, 1, 2, 3], [0, 1, 2, 3], 4, 10) == pytest.approx(2.0)


def test_routing_matrix_counts_and_checks():
    matrix = routing_matrix(torch.tensor([0, 2, 2, 1]), torch.tensor([1, 0, 0, 1]), 3, 2)
    np.testing.assert_array_equal(matrix, [[0, 1], [0, 1], [2, 0]])
    with pytest.raises(ValueError, match="expert_choice"):
        routing_matrix([3], [0], 3, 2)
    with pytest.raises(ValueError, match="labels"):
        routing_matrix([0, 1], [0], 3, 2)
    with pytest.raises(ValueError, match="no samples"):
        mutual_information([], [], 2, 2)
    with pytest.raises(ValueError, match="gate"):
        sample_entropy(np.zeros((0, 3)))


def test_a_collapsed_gate_has_zero_entropies_not_minus_zero():
    p = np.array([[1.0, 0.0, 0.0]] * 4)
    for value in (
        sample_entropy(p),
        usage_entropy(p),
        mutual_information([0, 0, 0, 0], [3, 3, 3, 3], 3, 10),
    ):
        assert value == 0.0 and math.copysign(1.0, value) == 1.0
        assert f"{value:.2f}" == "0.00"


def test_hard_routing_reports_the_published_conventions():
    """Top-1, stochastic and EM: H_s reported as 0, H_u and the per-task entropy from the
    argmax counts, not from the soft weights."""
    from smoe.families.gated.metrics import specialisation_metrics

    weights = np.array([[0.6, 0.4], [0.6, 0.4], [0.3, 0.7], [0.3, 0.7]])
    choice = weights.argmax(1)
    labels = np.array([0, 0, 1, 1])
    hard = specialisation_metrics(weights, choice, labels, labels, 2, 2, hard=True)
    assert hard["sample_entropy"] == 0.0
    assert hard["usage_entropy"] == pytest.approx(1.0)  # two experts, two samples each
    assert hard["per_task_entropy"] == 0.0  # each class to one expert
    assert hard["mutual_information"] == pytest.approx(1.0)
    soft = specialisation_metrics(weights, choice, labels, labels, 2, 2, hard=False)
    assert soft["sample_entropy"] > 0.8 and soft["per_task_entropy"] > 0.8
    assert soft["usage_entropy"] == pytest.approx(entropy_bits([0.45, 0.55]))
