"""Routing metrics of the cluster family, the one place their meaning is defined (accuracy is
the core's, :func:`smoe.core.metrics.accuracy`, re-exported):

* :func:`dispatch_matrix`: counts of samples per (expert, group), e.g. group = the cluster a
  synthetic sample was drawn from;
* :func:`dispatch_entropy`: Chen et al. (NeurIPS 2022)'s dispatch entropy
  sum_m (n_m / N) H(group | routed to expert m), natural log: 0 when every expert sees one
  cluster only, ln K when every expert sees the K clusters in equal shares.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from smoe.core.metrics import accuracy, as_numpy

__all__ = ["accuracy", "dispatch_entropy", "dispatch_matrix"]


def dispatch_matrix(dispatch: Any, groups: Any, experts: int, n_groups: int) -> np.ndarray:
    """Counts [experts, n_groups] (int64): entry (m, k) is how many samples of group k went to
    expert m. ``dispatch`` and ``groups`` are [N] integers in range."""
    dispatch = as_numpy(dispatch).astype(np.int64).ravel()
    groups = as_numpy(groups).astype(np.int64).ravel()
    if dispatch.shape != groups.shape:
        raise ValueError(f"{dispatch.size} dispatches but {groups.size} group labels")
    if experts < 1 or n_groups < 1:
        raise ValueError(f"need experts >= 1 and n_groups >= 1, got {experts}, {n_groups}")
    for name, values, top in (("dispatch", dispatch, experts), ("groups", groups, n_groups)):
        if values.size and (values.min() < 0 or values.max() >= top):
            raise ValueError(f"{name} values must lie in 0..{top - 1}")
    flat = np.bincount(dispatch * n_groups + groups, minlength=experts * n_groups)
    return flat.reshape(experts, n_groups)


def dispatch_entropy(matrix: Any) -> float:
    """sum_m (n_m / N) H(group | expert m) in nats, from counts [experts, groups].

    n_m is row m's total, N the grand total, H the entropy of row m's shares (0 log 0 = 0);
    experts that received no sample contribute 0.
    """
    counts = as_numpy(matrix).astype(np.float64)
    if counts.ndim != 2:
        raise ValueError(f"expected a [experts, groups] matrix, got shape {list(counts.shape)}")
    if (counts < 0).any():
        raise ValueError("dispatch counts must be >= 0")
    total = counts.sum()
    if total <= 0:
        raise ValueError("dispatch entropy of no samples")
    per_expert = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, per_expert, out=np.zeros_like(counts), where=per_expert > 0)
    logs = np.log(shares, out=np.zeros_like(shares), where=shares > 0)
    entropy = -(shares * logs).sum(axis=1)
    return float((per_expert[:, 0] / total * entropy).sum())
