"""Numbers every family reports the same way, defined once: classification accuracy,
parameter counts, and which of two validation values is better."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


def as_numpy(values: Any) -> np.ndarray:
    """A tensor (any device) or array-like as a numpy array."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def accuracy(scores: Any, labels: Any) -> float:
    """Percentage (0..100) of rows of ``scores`` [N, C] (logits or probabilities) whose argmax
    equals ``labels`` [N]."""
    scores, labels = as_numpy(scores), as_numpy(labels)
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(
            f"expected logits [N, C] and labels [N], got {list(scores.shape)} and "
            f"{list(labels.shape)}"
        )
    if labels.size == 0:
        raise ValueError("accuracy of no samples")
    return 100.0 * float(np.mean(scores.argmax(axis=1) == labels))


def parameter_count(model: nn.Module, trainable: bool = True) -> int:
    """Scalar parameters of ``model``: the ones training updates (``trainable``), or all."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def is_better(value: float, best: float | None, mode: str) -> bool:
    """Whether ``value`` improves on ``best`` for a metric to maximise or minimise; with
    mode ``last`` every epoch replaces the one before (the last epoch is kept)."""
    if best is None or mode == "last":
        return True
    return value > best if mode == "max" else value < best
