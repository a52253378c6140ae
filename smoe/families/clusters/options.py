"""The synthetic-cluster family's model options per kind, as JSON schemas (no PyTorch); a
test keeps them equal to :func:`smoe.families.clusters.models.build_cluster_model`'s."""

from __future__ import annotations

from typing import Any

from smoe.core.options import choice, flag, integer, object_schema

CLUSTER_ACTIVATIONS = ("cubic", "linear")
"""sigma of the cluster family's CNN filters (``smoe.families.clusters.models.ACTIVATIONS``; a test
keeps the two equal): z^3, the paper's "nonlinear" models, or z, its "linear" ones."""


def _scale(default: float, description: str) -> dict[str, Any]:
    return {
        "type": "number",
        "minimum": 0,
        "default": default,
        "description": f"{description}, at least 0",
    }


CLUSTER_CNN_OPTIONS: dict[str, Any] = {
    "filters_per_class": integer(8, "filters of each class (a CNN has 2 x this many filters)"),
    "activation": choice(
        CLUSTER_ACTIVATIONS, "cubic", "filter activation: cubic (z^3, 'nonlinear') or linear"
    ),
    "bias": flag(True, "trainable filter biases (the official code has them)"),
}


CLUSTER_KIND_OPTIONS: dict[str, dict[str, Any]] = {
    "cluster_moe": {
        "experts": integer(8, "number of experts M"),
        **CLUSTER_CNN_OPTIONS,
        "init_scale": _scale(1e-3, "factor on the experts' default uniform init"),
        "top_k": integer(1, "experts per sample k (1 <= k <= experts)"),
        "train_noise": flag(True, "add U[0, 1)^M to the router scores in training"),
        "test_noise": flag(False, "also at evaluation (the official code keeps it on)"),
        "load_balancing": _scale(0.0, "coefficient of the load-balancing loss (0: off)"),
    },
    "cluster_single": {
        **CLUSTER_CNN_OPTIONS,
        "init_scale": _scale(1.0, "factor on the default uniform init (the official singles 1)"),
    },
}
"""Options of the cluster family's model kinds
(``smoe.families.clusters.models.build_cluster_model``):
name -> JSON schema with the builder's default. ``dim`` comes from the data and ``classes``
is 2, so neither is an option."""


CLUSTER_MODEL_KINDS = tuple(CLUSTER_KIND_OPTIONS)


CLUSTER_EPOCHS = {"cluster_moe": 501, "cluster_single": 801}
"""Epochs of ``clusters.train.epochs: null`` by kind, the official code's at most 501 and 801
(the trainer's
``smoe.families.clusters.task.EPOCHS``; a test keeps the two equal): for job time limits."""


def cluster_kind_schema(kind: str) -> dict[str, Any]:
    """The JSON schema of a cluster-family kind's ``options`` mapping."""
    return object_schema(CLUSTER_KIND_OPTIONS[kind], f"option of model kind {kind!r}")


def cluster_defaults(kind: str) -> dict[str, Any]:
    """The builder's default of every option of a cluster-family ``kind``."""
    return {name: schema["default"] for name, schema in CLUSTER_KIND_OPTIONS[kind].items()}


def cluster_cross_errors(kind: str, options: dict[str, Any]) -> list[tuple[str, str]]:
    """(key relative to the options, message) for the rules that span a cluster model's
    options; run on options that passed :func:`cluster_kind_schema`."""
    if kind != "cluster_moe":
        return []
    merged = {**cluster_defaults(kind), **options}
    experts, top_k = merged["experts"], merged["top_k"]
    if not 1 <= top_k <= experts:
        return [("top_k", f"top_k={top_k} must be between 1 and experts={experts} (k <= M)")]
    return []
