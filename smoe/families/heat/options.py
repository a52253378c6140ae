"""The heat family's model options per kind and per gate, as JSON schemas (no PyTorch).

The schemas must match the constructors: ``tests/test_config.py`` compares each kind's and
each gate's option names and defaults with ``inspect.signature`` of the real constructors
(:data:`smoe.families.heat.registry.MODELS`), so a new constructor option fails that test
until it is described here. :func:`cross_errors` holds the rules that span options (K <= E,
the load losses' noise, the oracle gate's experts).
"""

from __future__ import annotations

from typing import Any

from smoe.core.options import choice, flag, fraction, integer, object_schema, odd_integer, widths
from smoe.families.heat.names import (
    AUX_LOSSES,
    BASELINE_INITS,
    COORDS,
    EXPERT_INITS,
    GATE_NAMES,
    LAYER_ACTIVATIONS,
    MODEL_KINDS,
    RC_SIGNALS,
    ROUTING_ACTIVATIONS,
)

KERNEL = odd_integer(3, "convolution kernel size")


BATCHNORM = flag(True, "batch normalisation between layers")


ACTIVATION = choice(LAYER_ACTIVATIONS, "relu", "activation between layers")


BIAS = flag(False, "layers with biases (the reference code has none)")


INIT = choice(BASELINE_INITS, "reference", "weight initialisation")


ROUTING_OPTIONS: dict[str, Any] = {
    "experts": integer(3, "number of experts E"),
    "k": integer(1, "experts selected per point K (1 <= K <= E)"),
    "weighted": flag(False, "scale each selected expert's output by its routing score"),
    "activation": choice(ROUTING_ACTIVATIONS, "identity", "activation on the gate's logits"),
    "noise": flag(False, "training noise N(0, (1/E)^2) on the routing scores"),
    "absolute": flag(False, "route on |score|"),
    "softmax": flag(False, "softmax over experts before top-K"),
    "rc_loss": flag(False, "routing-classification loss instead of the gate's task gradient"),
    "rc_weight": {
        "type": "number",
        "minimum": 0,
        "default": 1.0,
        "description": "weight of the routing-classification loss, at least 0",
    },
    "damping": flag(False, "damp the expert gradient at misrouted points"),
    "damping_factor": fraction(0.0, "share of the gradient a misrouted point keeps"),
    "quantile": fraction(0.3, "routing error quantile of the RC labels and damping"),
    "error_scale": {
        "anyOf": [{"const": "mse"}, {"type": "number", "exclusiveMinimum": 0}],
        "default": "mse",
        "description": "'mse' or a positive factor from the output gradient to the error",
    },
    "rc_signal": choice(RC_SIGNALS, "score", "gradient the RC labels are judged by"),
}
"""The fields of :class:`smoe.nn.routing.RoutingOptions` (SMoENet's ``**routing``)."""


SMOE_OPTIONS: dict[str, Any] = {
    "hidden_layers": {
        "type": ["array", "null"],
        "items": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "experts": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "experts of this layer (default: options.experts)",
                },
                "k": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "selections of this layer (default: options.k)",
                },
                "filters": integer(1, "filters per expert of this layer"),
            },
            "x-what": "key of a hidden layer",
        },
        "default": None,
        "description": "hidden SMoE layers before the final one, each {experts, k, filters}",
    },
    "hidden_activation": choice(LAYER_ACTIVATIONS, "relu", "activation after hidden layers"),
    "filters": {
        "type": "integer",
        "minimum": 1,
        "maximum": 1,
        "default": 1,
        "description": "filters per expert of the final layer: 1 (its output is the frame)",
    },
    "kernel_size": odd_integer(3, "expert kernel size"),
    "gate": {**choice(GATE_NAMES, "latent", "gate type"), "x-unknown": "gate"},
    "gate_options": {
        "type": ["object", "null"],
        "default": None,
        "description": "options of the gate (see GATE_OPTIONS)",
    },
    "mask_input": flag(False, "feed the region map to the gate"),
    "orthogonal": flag(False, "orthogonal init of the gate's weight layers"),
    "aux": {
        "type": ["object", "null"],
        "additionalProperties": False,
        "properties": {
            name: {"type": "number", "minimum": 0, "description": "coefficient, at least 0"}
            for name in AUX_LOSSES
        },
        "x-what": "auxiliary loss",
        "default": None,
        "description": "auxiliary gate losses by name -> coefficient",
    },
    "expert_init": choice(EXPERT_INITS, "reference", "how the expert filters start"),
    **ROUTING_OPTIONS,
}


KIND_OPTIONS: dict[str, dict[str, Any]] = {
    "persistence": {},
    "cnn": {
        "hidden": widths([4], "hidden channel widths"),
        "kernel_size": KERNEL,
        "batchnorm": BATCHNORM,
        "activation": ACTIVATION,
        "bias": BIAS,
        "init": INIT,
    },
    "lcn": {
        "hidden": widths([], "hidden channel widths"),
        "kernel_size": KERNEL,
        "batchnorm": BATCHNORM,
        "activation": ACTIVATION,
        "bias": BIAS,
        "init": INIT,
    },
    "coordconv": {
        "hidden": widths([4], "hidden channel widths"),
        "kernel_size": KERNEL,
        "batchnorm": BATCHNORM,
        "activation": ACTIVATION,
        "bias": BIAS,
        "coords": choice(COORDS, "every", "which convolutions see the coordinates"),
        "init": INIT,
    },
    "condconv": {
        "experts": integer(3, "expert kernels mixed per sample"),
        "hidden": widths([], "hidden channel widths"),
        "kernel_size": KERNEL,
        "batchnorm": BATCHNORM,
        "activation": ACTIVATION,
        "bias": BIAS,
        "init": INIT,
    },
    "convlcn": {
        "hidden": integer(3, "channels of the convolution before the LCN layer"),
        "kernel_size": KERNEL,
        "lcn_kernel_size": odd_integer(1, "kernel size of the locally connected layer"),
        "batchnorm": flag(False, "batch normalisation between the two layers"),
        "activation": choice(LAYER_ACTIVATIONS, None, "activation between the two layers"),
        "bias": BIAS,
        "init": INIT,
    },
    "mlp": {
        "hidden": widths([], "hidden layer widths"),
        "activation": ACTIVATION,
        "bias": BIAS,
        "init": INIT,
    },
    "smoe": SMOE_OPTIONS,
    "stencil": {
        "diffusivity": {
            "anyOf": [
                {"type": "number", "minimum": 0, "maximum": 0.25},
                {"const": "best"},
            ],
            "default": "best",
            "description": "a diffusion number in [0, 0.25], or 'best' (chosen on validation "
            "among the region types' diffusivities)",
        },
    },
    "generator": {},
}
"""Options of every model kind: name -> JSON schema (with the constructor's default)."""


GATE_BIAS = flag(False, "gate layers with biases")


GATE_OPTIONS: dict[str, dict[str, Any]] = {
    "latent": {
        "init_scale": {
            "type": ["number", "null"],
            "minimum": 0,
            "default": None,
            "description": "bound of the uniform init of the score map, at least 0; null for "
            "sqrt(3E/K)",
        },
    },
    "conv": {"bias": GATE_BIAS},
    "conv1": {"bias": GATE_BIAS},
    "coordconv": {"bias": GATE_BIAS},
    "coordconv-multi": {
        "hidden": integer(None, "channels of the hidden layers; null for E"),
        "bias": GATE_BIAS,
    },
    "linear": {"bias": GATE_BIAS},
    "lcn": {"bias": GATE_BIAS},
    "lcn1": {"bias": GATE_BIAS},
    "fixed": {},
}
"""Options of every gate (the SMoE option ``gate_options``)."""


assert set(KIND_OPTIONS) == set(MODEL_KINDS) and set(GATE_OPTIONS) == set(GATE_NAMES)


def kind_schema(kind: str) -> dict[str, Any]:
    """The JSON schema of a kind's ``options`` mapping."""
    return object_schema(KIND_OPTIONS[kind], f"option of model kind {kind!r}")


def gate_schema(gate: str) -> dict[str, Any]:
    """The JSON schema of a gate's ``gate_options`` mapping."""
    return object_schema(GATE_OPTIONS[gate], f"option of gate {gate!r}")


def defaults(kind: str) -> dict[str, Any]:
    """The constructor's default of every option of ``kind``."""
    return {name: schema.get("default") for name, schema in KIND_OPTIONS[kind].items()}


def cross_errors(kind: str, options: dict[str, Any], types: int | None) -> list[tuple[str, str]]:
    """(key relative to the options, message) for rules that span options.

    Run on options that passed :func:`kind_schema`. ``types`` (the region types of the map)
    is None when unknown; then the oracle gate's expert count is left to the model.
    """
    if kind != "smoe":
        return []
    merged = {**defaults("smoe"), **options}
    errors: list[tuple[str, str]] = []
    experts, k = merged["experts"], merged["k"]
    layers = [("", experts, k)]
    for index, layer in enumerate(merged["hidden_layers"] or []):
        layers.insert(
            index,
            (f"hidden_layers[{index}]", layer.get("experts", experts), layer.get("k", k)),
        )
    for where, e, kk in layers:
        if not 1 <= kk <= e:
            errors.append((where, f"k={kk} must be between 1 and experts={e} (K <= E)"))
    aux = {name for name, c in (merged["aux"] or {}).items() if c}
    loads = sorted({"load", "load_shazeer"} & aux)
    if loads:
        if not merged["noise"]:
            errors.append(("aux", f"the {loads[0]} loss needs noise: true"))
        for where, e, kk in layers:
            if e <= kk:
                errors.append(
                    (
                        "aux",
                        f"the {loads[0]} loss needs more experts than k"
                        f"{' in ' + where if where else ''} (experts={e}, k={kk})",
                    )
                )
    if merged["gate"] == "fixed" and types is not None:
        for where, e, _ in layers:
            if e < types:
                errors.append(
                    (
                        f"{where}.experts" if where else "experts",
                        f"gate 'fixed' routes each region type to its own expert: "
                        f"experts={e} is fewer than the map's {types} region types",
                    )
                )
    return errors
