"""Specialisation metrics of the gated-modular-network family (Krishnamurthy et al.,
arXiv 2302.14703); every entropy is in bits.

* :func:`accuracy`: percentage of samples whose largest log-probability is their label (the
  cluster family's definition, re-exported so both families score alike);
* :func:`routing_matrix`: counts of samples per (routed expert, true class);
* :func:`mutual_information`: I(E; Y) from the counts of (argmax expert, that expert's
  predicted class), the paper's measure of how much the experts split the task;
* :func:`sample_entropy`: mean_x H(p(.|x)), 0 when every gate decision is one-hot;
* :func:`usage_entropy`: H(mean_x p(.|x)), log2 E when the experts are used equally;
* :func:`per_task_entropy`: mean over classes of H(mean over the class of p), 0 when each
  class goes to one expert;
* :func:`specialisation_metrics`: the four entropies as the official code reports them for a
  model, soft (expectation, top-k > 1: from the gate weights) or hard (top-1, stochastic,
  EM: H_s = 0, usage and per-task entropies from the argmax choices' counts).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from smoe.core.metrics import accuracy, as_numpy

__all__ = [
    "accuracy",
    "entropy_bits",
    "mutual_information",
    "per_task_entropy",
    "routing_matrix",
    "sample_entropy",
    "specialisation_metrics",
    "usage_entropy",
]


def entropy_bits(probabilities: Any, axis: int = -1) -> np.ndarray:
    """-sum p log2 p along ``axis`` with 0 log 0 = 0."""
    p = as_numpy(probabilities).astype(np.float64)
    logs = np.log2(np.where(p > 0, p, 1.0))
    # + 0.0: a certain distribution gives 0, not -0 (which tables print as "-0.00")
    return -(p * logs).sum(axis=axis) + 0.0


def _gate_probabilities(p: Any) -> np.ndarray:
    p = as_numpy(p).astype(np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"expected gate probabilities [N >= 1, E], got {list(p.shape)}")
    return p


def routing_matrix(expert_choice: Any, labels: Any, experts: int, classes: int) -> np.ndarray:
    """Counts [experts, classes] (int64): entry (e, c) is how many samples of class c went to
    expert e."""
    choice = as_numpy(expert_choice).astype(np.int64).ravel()
    labels = as_numpy(labels).astype(np.int64).ravel()
    if choice.shape != labels.shape:
        raise ValueError(f"{choice.size} expert choices but {labels.size} labels")
    if experts < 1 or classes < 1:
        raise ValueError(f"need experts >= 1 and classes >= 1, got {experts}, {classes}")
    for name, values, top in (("expert_choice", choice, experts), ("labels", labels, classes)):
        if values.size and (values.min() < 0 or values.max() >= top):
            raise ValueError(f"{name} values must lie in 0..{top - 1}")
    flat = np.bincount(choice * classes + labels, minlength=experts * classes)
    return flat.reshape(experts, classes)


def mutual_information(
    expert_choice: Any, predicted_class: Any, experts: int, classes: int
) -> float:
    """I(E; Y) in bits of the empirical joint distribution of (argmax expert, the class that
    expert predicted): H(E) + H(Y) - H(E, Y). 0 when the chosen expert says nothing about the
    class; log2 E at most."""
    counts = routing_matrix(expert_choice, predicted_class, experts, classes).astype(np.float64)
    total = counts.sum()
    if total == 0:
        raise ValueError("mutual information of no samples")
    joint = counts / total
    value = (
        entropy_bits(joint.sum(axis=1))
        + entropy_bits(joint.sum(axis=0))
        - entropy_bits(joint.ravel())
    )
    return float(max(value, 0.0))  # >= 0 in exact arithmetic; rounding can dip below


def sample_entropy(p: Any) -> float:
    """mean over samples of H(p(.|x)) in bits, from gate probabilities [N, E]."""
    return float(entropy_bits(_gate_probabilities(p), axis=1).mean())


def usage_entropy(p: Any) -> float:
    """H(mean over samples of p(.|x)) in bits, from gate probabilities [N, E]; log2 E at
    most."""
    return float(entropy_bits(_gate_probabilities(p).mean(axis=0)))


def per_task_entropy(p: Any, labels: Any) -> float:
    """Mean over the classes present in ``labels`` of H(mean over that class's samples of
    p(.|x)) in bits; classes with no sample are left out of the mean."""
    p = _gate_probabilities(p)
    labels = as_numpy(labels).astype(np.int64).ravel()
    if labels.shape != (p.shape[0],):
        raise ValueError(f"{p.shape[0]} gate rows but {labels.size} labels")
    values = [float(entropy_bits(p[labels == c].mean(axis=0))) for c in np.unique(labels)]
    return float(np.mean(values))


def one_hot_choices(choice: Any, experts: int) -> np.ndarray:
    """Choices [N] as one-hot rows [N, experts] (float64): the gate output of a model that
    routes each sample to one expert, from which its usage is counted."""
    choice = as_numpy(choice).astype(np.int64).ravel()
    if choice.size and (choice.min() < 0 or choice.max() >= experts):
        raise ValueError(f"expert choices must lie in 0..{experts - 1}")
    return np.eye(experts, dtype=np.float64)[choice]


def specialisation_metrics(
    weights: Any,
    choice: Any,
    expert_pred: Any,
    labels: Any,
    experts: int,
    classes: int,
    hard: bool,
) -> dict[str, float]:
    """I(E;Y), H_s, H_u and the per-task entropy in bits, as the official code reports them.

    ``weights`` [N, E] is the gate output (softmax, or the renormalised top-k weights),
    ``choice`` [N] each sample's expert (the argmax of the weights), ``expert_pred`` [N] the
    class that expert predicted and ``labels`` [N] the true classes. For a ``hard`` model
    (top-1, stochastic, EM) the sample entropy is reported as 0 and the usage and per-task
    entropies come from the counts of the choices, not from the soft weights.
    """
    gate = one_hot_choices(choice, experts) if hard else _gate_probabilities(weights)
    return {
        "mutual_information": mutual_information(choice, expert_pred, experts, classes),
        "sample_entropy": 0.0 if hard else sample_entropy(gate),
        "usage_entropy": usage_entropy(gate),
        "per_task_entropy": per_task_entropy(gate, labels),
    }
