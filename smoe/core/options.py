"""Model options per kind as JSON schemas, checked when the config is validated (no PyTorch).

A model's ``options`` reach its constructor (``smoe.families.heat.registry.MODELS[kind]``) as keyword
arguments. Refusing a bad option there would happen inside the train job, after Snakemake
has deleted the job's old outputs; so every option is described here, with its type, range
and default, and :func:`option_errors` checks a config's options against these schemas plus
the rules that span options (K <= E, the load losses' noise, the oracle gate's experts).

The schemas must match the constructors: ``tests/test_config.py`` compares each kind's and
each gate's option names and defaults with ``inspect.signature`` of the real constructors,
so a new constructor option fails that test until it is described here.
"""

from __future__ import annotations

from typing import Any

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


def _bool(default: bool, description: str) -> dict[str, Any]:
    return {"type": "boolean", "default": default, "description": description}


def _int(default: int | None, description: str, minimum: int = 1) -> dict[str, Any]:
    kind: Any = "integer" if default is not None else ["integer", "null"]
    return {"type": kind, "minimum": minimum, "default": default, "description": description}


def _odd(default: int, description: str) -> dict[str, Any]:
    """A kernel size: "same" padding k // 2 keeps the grid's size only for odd k."""
    return {
        "type": "integer",
        "minimum": 1,
        "odd": True,
        "default": default,
        "description": f"{description}: a positive odd integer ('same' padding keeps the grid)",
    }


def _choice(choices: tuple[str, ...], default: str | None, description: str) -> dict[str, Any]:
    allowed: list[Any] = list(choices) + ([None] if default is None else [])
    return {"enum": allowed, "default": default, "description": description}


def _widths(default: list[int], description: str) -> dict[str, Any]:
    return {
        "type": "array",
        "items": {"type": "integer", "minimum": 1},
        "default": default,
        "description": f"{description} (a list of positive integers)",
    }


def _fraction(default: float, description: str) -> dict[str, Any]:
    return {
        "type": "number",
        "minimum": 0,
        "maximum": 1,
        "default": default,
        "description": f"{description}, in [0, 1]",
    }


def _object(properties: dict[str, Any], what: str) -> dict[str, Any]:
    """The options of one kind (or gate): only the named ones, each with its schema."""
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "x-what": what,
    }


KERNEL = _odd(3, "convolution kernel size")
BATCHNORM = _bool(True, "batch normalisation between layers")
ACTIVATION = _choice(LAYER_ACTIVATIONS, "relu", "activation between layers")
BIAS = _bool(False, "layers with biases (the reference code has none)")
INIT = _choice(BASELINE_INITS, "reference", "weight initialisation")

ROUTING_OPTIONS: dict[str, Any] = {
    "experts": _int(3, "number of experts E"),
    "k": _int(1, "experts selected per point K (1 <= K <= E)"),
    "weighted": _bool(False, "scale each selected expert's output by its routing score"),
    "activation": _choice(ROUTING_ACTIVATIONS, "identity", "activation on the gate's logits"),
    "noise": _bool(False, "training noise N(0, (1/E)^2) on the routing scores"),
    "absolute": _bool(False, "route on |score|"),
    "softmax": _bool(False, "softmax over experts before top-K"),
    "rc_loss": _bool(False, "routing-classification loss instead of the gate's task gradient"),
    "rc_weight": {
        "type": "number",
        "minimum": 0,
        "default": 1.0,
        "description": "weight of the routing-classification loss, at least 0",
    },
    "damping": _bool(False, "damp the expert gradient at misrouted points"),
    "damping_factor": _fraction(0.0, "share of the gradient a misrouted point keeps"),
    "quantile": _fraction(0.3, "routing error quantile of the RC labels and damping"),
    "error_scale": {
        "anyOf": [{"const": "mse"}, {"type": "number", "exclusiveMinimum": 0}],
        "default": "mse",
        "description": "'mse' or a positive factor from the output gradient to the error",
    },
    "rc_signal": _choice(RC_SIGNALS, "score", "gradient the RC labels are judged by"),
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
                "filters": _int(1, "filters per expert of this layer"),
            },
            "x-what": "key of a hidden layer",
        },
        "default": None,
        "description": "hidden SMoE layers before the final one, each {experts, k, filters}",
    },
    "hidden_activation": _choice(LAYER_ACTIVATIONS, "relu", "activation after hidden layers"),
    "filters": {
        "type": "integer",
        "minimum": 1,
        "maximum": 1,
        "default": 1,
        "description": "filters per expert of the final layer: 1 (its output is the frame)",
    },
    "kernel_size": _odd(3, "expert kernel size"),
    "gate": {**_choice(GATE_NAMES, "latent", "gate type"), "x-unknown": "gate"},
    "gate_options": {
        "type": ["object", "null"],
        "default": None,
        "description": "options of the gate (see GATE_OPTIONS)",
    },
    "mask_input": _bool(False, "feed the region map to the gate"),
    "orthogonal": _bool(False, "orthogonal init of the gate's weight layers"),
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
    "expert_init": _choice(EXPERT_INITS, "reference", "how the expert filters start"),
    **ROUTING_OPTIONS,
}

KIND_OPTIONS: dict[str, dict[str, Any]] = {
    "persistence": {},
    "cnn": {
        "hidden": _widths([4], "hidden channel widths"),
        "kernel_size": KERNEL,
        "batchnorm": BATCHNORM,
        "activation": ACTIVATION,
        "bias": BIAS,
        "init": INIT,
    },
    "lcn": {
        "hidden": _widths([], "hidden channel widths"),
        "kernel_size": KERNEL,
        "batchnorm": BATCHNORM,
        "activation": ACTIVATION,
        "bias": BIAS,
        "init": INIT,
    },
    "coordconv": {
        "hidden": _widths([4], "hidden channel widths"),
        "kernel_size": KERNEL,
        "batchnorm": BATCHNORM,
        "activation": ACTIVATION,
        "bias": BIAS,
        "coords": _choice(COORDS, "every", "which convolutions see the coordinates"),
        "init": INIT,
    },
    "condconv": {
        "experts": _int(3, "expert kernels mixed per sample"),
        "hidden": _widths([], "hidden channel widths"),
        "kernel_size": KERNEL,
        "batchnorm": BATCHNORM,
        "activation": ACTIVATION,
        "bias": BIAS,
        "init": INIT,
    },
    "convlcn": {
        "hidden": _int(3, "channels of the convolution before the LCN layer"),
        "kernel_size": KERNEL,
        "lcn_kernel_size": _odd(1, "kernel size of the locally connected layer"),
        "batchnorm": _bool(False, "batch normalisation between the two layers"),
        "activation": _choice(LAYER_ACTIVATIONS, None, "activation between the two layers"),
        "bias": BIAS,
        "init": INIT,
    },
    "mlp": {
        "hidden": _widths([], "hidden layer widths"),
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

GATE_BIAS = _bool(False, "gate layers with biases")
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
        "hidden": _int(None, "channels of the hidden layers; null for E"),
        "bias": GATE_BIAS,
    },
    "linear": {"bias": GATE_BIAS},
    "lcn": {"bias": GATE_BIAS},
    "lcn1": {"bias": GATE_BIAS},
    "fixed": {},
}
"""Options of every gate (the SMoE option ``gate_options``)."""

assert set(KIND_OPTIONS) == set(MODEL_KINDS) and set(GATE_OPTIONS) == set(GATE_NAMES)

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
    "filters_per_class": _int(8, "filters of each class (a CNN has 2 x this many filters)"),
    "activation": _choice(
        CLUSTER_ACTIVATIONS, "cubic", "filter activation: cubic (z^3, 'nonlinear') or linear"
    ),
    "bias": _bool(True, "trainable filter biases (the official code has them)"),
}

CLUSTER_KIND_OPTIONS: dict[str, dict[str, Any]] = {
    "cluster_moe": {
        "experts": _int(8, "number of experts M"),
        **CLUSTER_CNN_OPTIONS,
        "init_scale": _scale(1e-3, "factor on the experts' default uniform init"),
        "top_k": _int(1, "experts per sample k (1 <= k <= experts)"),
        "train_noise": _bool(True, "add U[0, 1)^M to the router scores in training"),
        "test_noise": _bool(False, "also at evaluation (the official code keeps it on)"),
        "load_balancing": _scale(0.0, "coefficient of the load-balancing loss (0: off)"),
    },
    "cluster_single": {
        **CLUSTER_CNN_OPTIONS,
        "init_scale": _scale(1.0, "factor on the default uniform init (the official singles 1)"),
    },
}
"""Options of the cluster family's model kinds (``smoe.families.clusters.models.build_cluster_model``):
name -> JSON schema with the builder's default. ``dim`` comes from the data and ``classes``
is 2, so neither is an option."""

CLUSTER_MODEL_KINDS = tuple(CLUSTER_KIND_OPTIONS)

CLUSTER_EPOCHS = {"cluster_moe": 501, "cluster_single": 801}
"""Epochs of ``clusters.train.epochs: null`` by kind, the official code's at most 501 and 801
(the trainer's
``smoe.families.clusters.task.EPOCHS``; a test keeps the two equal): for job time limits."""


def cluster_kind_schema(kind: str) -> dict[str, Any]:
    """The JSON schema of a cluster-family kind's ``options`` mapping."""
    return _object(CLUSTER_KIND_OPTIONS[kind], f"option of model kind {kind!r}")


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


def kind_schema(kind: str) -> dict[str, Any]:
    """The JSON schema of a kind's ``options`` mapping."""
    return _object(KIND_OPTIONS[kind], f"option of model kind {kind!r}")


def gate_schema(gate: str) -> dict[str, Any]:
    """The JSON schema of a gate's ``gate_options`` mapping."""
    return _object(GATE_OPTIONS[gate], f"option of gate {gate!r}")


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


# -- the gated modular MoE family (Krishnamurthy et al. 2023) ------------------------------

GATED_VARIANTS = ("expectation", "stochastic", "topk", "em")
"""Routing variants of ``smoe.families.gated.models.GatedMoE`` (a test keeps the two equal)."""

_GATED_IMPORTANCE = {
    "type": ["number", "null"],
    "minimum": 0,
    "default": None,
    "description": "weight w of the importance loss w * CV(I)^2 (published: expectation 0.2, "
    "top-2 0.4, attentive expectation 0.6, attentive top-2 0.8); null: off",
}
_GATED_SIMILARITY = {
    "type": ["object", "null"],
    "additionalProperties": False,
    "default": None,
    "description": "the sample-similarity loss (null: off)",
    "properties": {
        "beta_s": {
            "type": "number",
            "minimum": 0,
            "description": "weight of the same-expert term (published: 1e-5)",
        },
        "beta_d": {
            "type": "number",
            "minimum": 0,
            "description": "weight of the different-experts term, which is divided by B^2 "
            "(published: expectation 1e-2, top-2 1e-6, attentive top-2 1e-4)",
        },
        "features": {
            "type": ["string", "null"],
            "description": "null: pixel distances (published); else the name of a gated_single "
            "model under gated.models whose trained last hidden layer (32 features) gives the "
            "distances (our alternative)",
        },
    },
    "x-what": "key of option similarity",
}
_GATED_ROUTING = {
    "variant": _choice(GATED_VARIANTS, "expectation", "routing: expectation, stochastic, topk, em"),
    "top_k": _int(1, "experts per sample of variant topk (1 <= top_k <= experts)"),
}

GATED_KIND_OPTIONS: dict[str, dict[str, Any]] = {
    "gated_moe": {
        "experts": _int(10, "number of experts E"),
        **_GATED_ROUTING,
        "attentive": _bool(False, "attentive gate (queries from the gate, keys from experts)"),
        "temperature": {
            "type": "number",
            "exclusiveMinimum": 0,
            "default": 1.0,
            "description": "softmax temperature T of the gate, above 0",
        },
        "importance": _GATED_IMPORTANCE,
        "similarity": _GATED_SIMILARITY,
    },
    "gated_single": {
        "params_budget": {
            "anyOf": [{"const": "match"}, {"type": "integer", "minimum": 1}, {"type": "null"}],
            "default": None,
            "description": "null: exactly one expert (the published single model); 'match': "
            "an expert widened to the parameter count of the MoE of options experts and "
            "attentive (an extra, stronger baseline); or a positive integer",
        },
        "experts": _int(10, "experts of the MoE whose size 'match' copies"),
        "attentive": _bool(False, "whether that MoE's gate is attentive"),
    },
    "gated_distilled": {
        "teacher": {
            "type": ["string", "null"],
            "default": None,
            "description": "name of the trained gated_moe model under gated.models whose "
            "experts are frozen and reused and whose gate trunk the new gate copies (the "
            "published one: an attentive expectation MoE trained with L_imp); required. The "
            "student keeps the teacher's variant and k and trains unregularised",
        },
    },
}
"""Options of the gated family's kinds (``smoe.families.gated.task.build_gated_model``): name ->
JSON schema with the builder's default. The input shape and the 10 classes come from the
data, so neither is an option."""

GATED_MODEL_KINDS = tuple(GATED_KIND_OPTIONS)


def gated_kind_schema(kind: str) -> dict[str, Any]:
    """The JSON schema of a gated-family kind's ``options`` mapping."""
    return _object(GATED_KIND_OPTIONS[kind], f"option of model kind {kind!r}")


def gated_defaults(kind: str) -> dict[str, Any]:
    """The builder's default of every option of a gated-family ``kind``."""
    return {name: schema["default"] for name, schema in GATED_KIND_OPTIONS[kind].items()}


def gated_cross_errors(kind: str, options: dict[str, Any]) -> list[tuple[str, str]]:
    """(key relative to the options, message) for the rules that span a gated model's
    options (a distilled model has none of its own: it inherits its teacher's routing)."""
    merged = {**gated_defaults(kind), **options}
    errors: list[tuple[str, str]] = []
    if kind != "gated_moe":
        return errors
    experts = merged["experts"]
    variant, top_k = merged["variant"], merged["top_k"]
    if top_k is not None and variant != "topk" and top_k != 1:
        errors.append(("top_k", f"top_k={top_k} applies to variant topk only, not {variant}"))
    elif top_k is not None and experts is not None and not 1 <= top_k <= experts:
        errors.append(("top_k", f"top_k={top_k} must be between 1 and experts={experts} (k <= E)"))
    similarity = merged["similarity"]
    if similarity is not None and not (similarity.get("beta_s") or similarity.get("beta_d")):
        errors.append(
            ("similarity", "give beta_s and/or beta_d above 0 (or similarity: null for off)")
        )
    return errors
