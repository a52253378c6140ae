"""The gated family's model options per kind, as JSON schemas (no PyTorch); a test keeps
the variants equal to :data:`smoe.families.gated.models.VARIANTS`."""

from __future__ import annotations

from typing import Any

from smoe.core.options import choice, flag, integer, object_schema

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
    "variant": choice(GATED_VARIANTS, "expectation", "routing: expectation, stochastic, topk, em"),
    "top_k": integer(1, "experts per sample of variant topk (1 <= top_k <= experts)"),
}


GATED_KIND_OPTIONS: dict[str, dict[str, Any]] = {
    "gated_moe": {
        "experts": integer(10, "number of experts E"),
        **_GATED_ROUTING,
        "attentive": flag(False, "attentive gate (queries from the gate, keys from experts)"),
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
        "experts": integer(10, "experts of the MoE whose size 'match' copies"),
        "attentive": flag(False, "whether that MoE's gate is attentive"),
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
    return object_schema(GATED_KIND_OPTIONS[kind], f"option of model kind {kind!r}")


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
