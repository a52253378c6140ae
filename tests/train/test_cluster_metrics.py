import math

import numpy as np
import pytest
import torch

from smoe.families.clusters.metrics import accuracy, dispatch_entropy, dispatch_matrix


def test_accuracy_is_the_percentage_of_argmax_hits():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0], [0.1, 0.2]])
    labels = torch.tensor([0, 1, 1, 0])
    assert accuracy(logits, labels) == pytest.approx(50.0)
    assert accuracy(logits.numpy(), [0, 1, 0, 1]) == pytest.approx(100.0)


def test_accuracy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="logits"):
        accuracy(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="no samples"):
        accuracy(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))


def test_dispatch_matrix_counts_by_hand():
    dispatch = torch.tensor([0, 0, 1, 2, 2, 2, 0])
    groups = torch.tensor([1, 1, 0, 0, 1, 1, 0])
    matrix = dispatch_matrix(dispatch, groups, experts=4, n_groups=2)
    expected = np.array([[1, 2], [1, 0], [1, 2], [0, 0]])
    np.testing.assert_array_equal(matrix, expected)
    assert matrix.dtype == np.int64


def test_dispatch_matrix_rejects_out_of_range_and_mismatch():
    with pytest.raises(ValueError, match="dispatch values"):
        dispatch_matrix([0, 3], [0, 0], experts=3, n_groups=1)
    with pytest.raises(ValueError, match="groups values"):
        dispatch_matrix([0, 1], [0, -1], experts=3, n_groups=2)
    with pytest.raises(ValueError, match="group labels"):
        dispatch_matrix([0, 1], [0], experts=3, n_groups=2)


def test_perfect_routing_has_zero_entropy():
    # Each expert sees one cluster only (two experts share cluster 3, one sees nothing).
    matrix = np.array([[10, 0, 0, 0], [0, 7, 0, 0], [0, 0, 5, 0], [0, 0, 0, 2], [0, 0, 0, 4]])
    assert dispatch_entropy(matrix) == pytest.approx(0.0, abs=1e-12)
    assert dispatch_entropy(np.vstack([matrix, np.zeros((1, 4))])) == pytest.approx(0.0, abs=1e-12)


def test_uniform_routing_has_entropy_ln_k():
    assert dispatch_entropy(np.full((8, 4), 25)) == pytest.approx(math.log(4))
    # Unequal expert loads, each with equal cluster shares: still ln K.
    assert dispatch_entropy(np.array([[1, 1, 1], [5, 5, 5]])) == pytest.approx(math.log(3))


def test_two_by_two_by_hand():
    # Expert 0: 3 of cluster 0, 1 of cluster 1; expert 1: 4 of cluster 1. N = 8.
    # H0 = -(3/4 ln 3/4 + 1/4 ln 1/4) = 0.562335; H1 = 0; entropy = 4/8 * H0 + 4/8 * 0.
    h0 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert dispatch_entropy(torch.tensor([[3, 1], [0, 4]])) == pytest.approx(0.5 * h0)
    assert 0.5 * h0 == pytest.approx(0.2811676, abs=1e-6)


def test_entropy_end_to_end_from_dispatch():
    dispatch = [0, 0, 0, 0, 1, 1, 1, 1]
    clusters = [0, 0, 0, 1, 1, 1, 1, 1]
    matrix = dispatch_matrix(dispatch, clusters, experts=3, n_groups=2)
    h0 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert dispatch_entropy(matrix) == pytest.approx(0.5 * h0)


def test_entropy_rejects_empty_and_negative():
    with pytest.raises(ValueError, match="no samples"):
        dispatch_entropy(np.zeros((2, 2)))
    with pytest.raises(ValueError, match=">= 0"):
        dispatch_entropy(np.array([[1, -1], [0, 2]]))
    with pytest.raises(ValueError, match="matrix"):
        dispatch_entropy(np.ones(3))
