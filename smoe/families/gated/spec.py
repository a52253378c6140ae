"""What a gated-family model is: its kinds, options, train settings, published name, and how
it is built from them (Krishnamurthy et al., arXiv 2302.14703, as the official code runs it).

Kinds (:data:`GATED_KINDS`) and their options:

* ``gated_moe``: ``experts`` (10), ``variant`` (expectation | stochastic | topk | em),
  ``top_k`` (1; the top-1 and the top-k > 1 rules differ, see :mod:`smoe.families.gated.models`),
  ``attentive`` (false), ``temperature`` (1.0), ``importance`` (null: off; else the weight
  w) and ``similarity`` (null: off; else ``beta_s``, ``beta_d`` and ``features``: null for
  the published pixel distances, or a trained ``gated_single``'s ``best.pt`` whose hidden
  features give the distances, our alternative);
* ``gated_single``: ``params_budget`` (null: exactly one expert, the published baseline;
  ``"match"``: an expert widened to the parameter count of the MoE of the options
  ``experts`` and ``attentive``, an extra, stronger baseline; or an integer);
* ``gated_distilled``: ``teacher`` (the ``best.pt`` of a trained MoE, the published one an
  attentive expectation MoE trained with L_imp): the teacher's experts, frozen, under a
  plain gate that copies the teacher's gate trunk; trained unregularised.

Train settings (``spec.train``; :data:`TRAIN_DEFAULTS`): ``epochs`` 100, ``batch_size``
512, ``lr`` 1e-3, ``weight_decay`` (null: the kind's published value, :data:`WEIGHT_DECAY`:
MoE 1e-3, single 1e-6, distilled 0), ``select`` ``{metric: val_accuracy, mode: last}``
(``last``: the last epoch's model is kept and tested, as the official code tests it;
``max`` / ``min`` keep the best validation epoch), ``device``, ``precision`` (fp32),
``threads``, ``deterministic``, ``progress``, ``checkpoint_every``, ``processes``,
``stop_at`` and ``early_stop``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from smoe.core.config import ModelSpec
from smoe.core.errors import InputError
from smoe.families.gated.images import CLASSES
from smoe.families.gated.models import (
    GatedMoE,
    SingleModel,
    check_architecture,
    moe_parameter_count,
    parameter_count,
)

FAMILY = "gated"
GATED_KINDS = ("gated_moe", "gated_single", "gated_distilled")

WEIGHT_DECAY = {"gated_moe": 1e-3, "gated_single": 1e-6, "gated_distilled": 0.0}
"""The official code's Adam weight decay by kind: the MoE's 1e-3, the single expert's 1e-6,
the distilled student's none."""

TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 100,
    "batch_size": 512,
    "lr": 1e-3,
    "weight_decay": None,
    "select": {"metric": "val_accuracy", "mode": "last"},
    "device": "cpu",
    "precision": "fp32",
    "threads": 1,
    "deterministic": True,
    "progress": True,
    "stop_at": None,
    "early_stop": None,
    "checkpoint_every": 1,
    "processes": 1,
}
"""Every train setting of the gated family with its default (the official code's)."""

MOE_OPTIONS: dict[str, Any] = {
    "experts": 10,
    "variant": "expectation",
    "top_k": 1,
    "attentive": False,
    "temperature": 1.0,
    "importance": None,
    "similarity": None,
}
SINGLE_OPTIONS: dict[str, Any] = {"params_budget": None, "experts": 10, "attentive": False}
DISTILLED_OPTIONS: dict[str, Any] = {"teacher": None}
OPTIONS = {
    "gated_moe": MOE_OPTIONS,
    "gated_single": SINGLE_OPTIONS,
    "gated_distilled": DISTILLED_OPTIONS,
}

SIMILARITY_KEYS = {"beta_s", "beta_d", "features"}

NOT_IDENTITY = ("progress", "checkpoint_every", "processes")
"""Train settings that cannot change a result, so a ``last.pt`` is resumed across them."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def gated_options(kind: str, options: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """The options of ``kind`` with defaults filled in; unknown keys and bad regularisers
    raise InputError."""
    known = OPTIONS[kind]
    given = dict(options or {})
    for key in given:
        if key not in known:
            raise InputError(
                f"{where}: option {key!r} is not an option of {kind}; known: {', '.join(known)}"
            )
    merged = {**copy.deepcopy(known), **given}
    weight = merged.get("importance")
    if weight is not None and (not _is_number(weight) or weight < 0):
        raise InputError(
            f"{where}: option importance must be a number >= 0 or null, got {weight!r}"
        )
    similarity = merged.get("similarity")
    if similarity is not None:
        if not isinstance(similarity, Mapping) or set(similarity) - SIMILARITY_KEYS:
            raise InputError(
                f"{where}: option similarity must be a mapping of beta_s, beta_d and "
                f"features, got {similarity!r}"
            )
        for key in ("beta_s", "beta_d"):
            if not _is_number(similarity.get(key, 0.0)):
                raise InputError(f"{where}: option similarity.{key} must be a number")
        features = similarity.get("features")
        if features is not None and not isinstance(features, str | Path):
            raise InputError(
                f"{where}: option similarity.features must be null (pixel distances) or the "
                f"path of a trained gated_single's best.pt, got {features!r}"
            )
    budget = merged.get("params_budget")
    if kind == "gated_single" and budget not in (None, "match"):
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise InputError(
                f"{where}: option params_budget must be null (one expert), 'match' or a "
                f"positive integer, got {budget!r}"
            )
    return merged


def weight_decay(kind: str, train: Mapping[str, Any]) -> float:
    """The Adam weight decay a model trains with: its setting, or its kind's published one."""
    value = train.get("weight_decay")
    return WEIGHT_DECAY[kind] if value is None else float(value)


def build_gated_model(
    kind: str,
    options: Mapping[str, Any] | None,
    in_shape: tuple[int, ...],
    classes: int,
    architecture: str = "mnist",
    teacher: GatedMoE | None = None,
) -> nn.Module:
    """The model of ``kind`` with ``options`` (see the module docstring) for images of
    ``in_shape`` (C, H, W), ``classes`` classes and the published ``architecture``; a
    distilled model is built on its trained ``teacher``."""
    from smoe.families.gated.models import distill_gate

    where = f"kind {kind}"
    if kind not in GATED_KINDS:
        raise InputError(f"kind {kind!r} is not a gated model; known: {', '.join(GATED_KINDS)}")
    opts = gated_options(kind, options, where)
    in_shape = tuple(int(n) for n in in_shape)
    check_architecture(architecture)
    if kind == "gated_moe":
        return GatedMoE(
            in_shape,
            classes,
            experts=opts["experts"],
            variant=opts["variant"],
            top_k=opts["top_k"],
            attentive=opts["attentive"],
            temperature=opts["temperature"],
            architecture=architecture,
        )
    if kind == "gated_single":
        budget = opts["params_budget"]
        if budget == "match":
            budget = moe_parameter_count(
                in_shape, classes, opts["experts"], opts["attentive"], architecture
            )
        return SingleModel(in_shape, classes, budget, architecture)
    if teacher is None:
        raise InputError(f"{where}: a distilled model needs its trained teacher")
    if tuple(teacher.in_shape) != in_shape or teacher.classes != classes:
        raise InputError(
            f"{where}: teacher {opts['teacher']!r} was trained on images {teacher.in_shape} "
            f"of {teacher.classes} classes, these are {in_shape} of {classes}"
        )
    return distill_gate(teacher)


def architecture(model: nn.Module) -> dict[str, Any]:
    """How to rebuild ``model`` without its options (a distilled one without its teacher)."""
    if isinstance(model, GatedMoE):
        return {
            "type": "moe",
            "args": {
                "in_shape": list(model.in_shape),
                "classes": model.classes,
                "experts": model.n_experts,
                "variant": model.variant,
                "top_k": model.top_k,
                "attentive": model.attentive,
                "temperature": model.temperature,
                "architecture": model.architecture,
            },
        }
    assert isinstance(model, SingleModel)
    net = model.net
    return {
        "type": "single",
        "args": {
            "in_shape": list(net.trunk.in_shape),
            "classes": net.classes,
            "params_budget": parameter_count(model) if model.mixture_sized else None,
            "architecture": net.architecture,
        },
    }


def rebuild(arch: Mapping[str, Any]) -> nn.Module:
    args = dict(arch["args"])
    args["in_shape"] = tuple(args["in_shape"])
    if arch["type"] == "moe":
        return GatedMoE(**args)
    return SingleModel(**args)


def gated_label(
    kind: str, options: Mapping[str, Any], teacher_options: Mapping[str, Any] | None = None
) -> str:
    """The paper's name of a configured model, e.g. ``top-2 + L_imp``, ``attentive
    stochastic``, ``distilled attentive expectation + L_imp`` or ``single``: the key that
    puts the published figure beside ours, whatever the model is called in the config.
    Models the paper has no figure for get names of their own (``EM``, ``single
    (mixture-sized)``, ``+ L_s (network features)``)."""
    if kind == "gated_single":
        budget = {**SINGLE_OPTIONS, **dict(options or {})}["params_budget"]
        return "single" if budget is None else "single (mixture-sized)"
    if kind == "gated_distilled":
        return "distilled " + gated_label("gated_moe", teacher_options or {})
    opts = {**MOE_OPTIONS, **dict(options or {})}
    variant, top_k = opts["variant"], opts["top_k"]
    name = {"expectation": "expectation", "stochastic": "stochastic", "em": "EM"}.get(
        variant, f"top-{top_k}"
    )
    if opts["attentive"]:
        name = f"attentive {name}"
    if opts.get("importance"):
        name += " + L_imp"
    similarity = opts.get("similarity")
    if similarity:
        name += " + L_s (network features)" if similarity.get("features") else " + L_s"
    return name


def _check_settings(name: str, train: dict[str, Any]) -> None:
    where = f"model {name!r}: train"
    for key in ("epochs", "batch_size", "checkpoint_every", "processes"):
        value = train[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{where}.{key} must be a positive integer, got {value!r}")
    if not _is_number(train["lr"]) or train["lr"] < 0:
        raise InputError(f"{where}.lr must be a number >= 0, got {train['lr']!r}")
    decay = train["weight_decay"]
    if decay is not None and (not _is_number(decay) or decay < 0):
        raise InputError(f"{where}.weight_decay must be a number >= 0 or null, got {decay!r}")
    if train["stop_at"] is not None and not _is_number(train["stop_at"]):
        raise InputError(f"{where}.stop_at must be a number or null, got {train['stop_at']!r}")
    early = train["early_stop"]
    if early is not None and (isinstance(early, bool) or not isinstance(early, int) or early < 0):
        raise InputError(f"{where}.early_stop must be an integer >= 0 or null, got {early!r}")
    if train["device"] not in ("cpu", "cuda", "auto"):
        raise InputError(f"{where}.device must be cpu, cuda or auto, got {train['device']!r}")
    if train["precision"] != "fp32":
        raise InputError(f"{where}.precision must be fp32, got {train['precision']!r}")
    threads = train["threads"]
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 0
    ):
        raise InputError(f"{where}.threads must be an integer >= 0 or null, got {threads!r}")
    for key in ("deterministic", "progress"):
        if not isinstance(train[key], bool):
            raise InputError(f"{where}.{key} must be true or false, got {train[key]!r}")
    select = train["select"]
    if not isinstance(select.get("metric"), str) or select.get("mode") not in (
        "min",
        "max",
        "last",
    ):
        raise InputError(f"{where}.select must hold a metric name and mode min, max or last")
    if select["mode"] == "last":
        for key in ("stop_at", "early_stop"):
            if train[key] is not None:
                raise InputError(
                    f"{where}.{key} needs a direction to compare with: select.mode last keeps "
                    f"the last epoch; choose select.mode max or min, or {key}: null"
                )


def resolve_gated_spec(spec: ModelSpec | Mapping[str, Any]) -> ModelSpec:
    """The spec with every train default filled in and checked (InputError naming the key).
    A mapping may leave out ``options``, ``train``, ``data`` and ``evaluate``."""
    if isinstance(spec, ModelSpec):
        spec = spec.to_dict()
    if not isinstance(spec, Mapping):
        raise InputError(f"a model spec must be a mapping, got {type(spec).__name__}")
    for key in ("name", "kind"):
        if not isinstance(spec.get(key), str):
            raise InputError(f"model spec: {key} must be a string, got {spec.get(key)!r}")
    name, kind = spec["name"], spec["kind"]
    if kind not in GATED_KINDS:
        raise InputError(
            f"model {name!r}: kind {kind!r} is not a gated model; known: {', '.join(GATED_KINDS)}"
        )
    sections = {}
    for key in ("options", "train", "data", "evaluate"):
        value = spec.get(key) or {}
        if not isinstance(value, Mapping):
            raise InputError(f"model {name!r}: {key} must be a mapping, got {value!r}")
        sections[key] = copy.deepcopy(dict(value))
    for section, known in (("train", TRAIN_DEFAULTS), ("data", {}), ("evaluate", {})):
        for key in sections[section]:
            if key not in known:
                raise InputError(
                    f"model {name!r}: {section}.{key} is not a setting of the gated family; "
                    f"known: {', '.join(known) or 'none'}"
                )
    given = sections["train"]
    select = given.pop("select", None) or {}
    if not isinstance(select, Mapping):
        raise InputError(f"model {name!r}: train.select must be a mapping, got {select!r}")
    train = {**copy.deepcopy(TRAIN_DEFAULTS), **given}
    train["select"] = {**TRAIN_DEFAULTS["select"], **select}
    _check_settings(name, train)
    options = gated_options(kind, sections["options"], f"model {name!r}")
    if kind == "gated_distilled":
        if not isinstance(options["teacher"], str) or not options["teacher"]:
            raise InputError(
                f"model {name!r}: option teacher must be the path of a trained gated MoE's "
                f"best.pt, got {options['teacher']!r}"
            )
    else:  # options checked on a small stand-in input before any work
        try:
            build_gated_model(kind, sections["options"], (1, 8, 8), CLASSES)
        except InputError as exc:
            raise InputError(f"model {name!r}: {exc}") from exc
    return ModelSpec(name, kind, sections["options"], train, sections["data"], sections["evaluate"])


def seed_options(
    spec: ModelSpec | Mapping[str, Any],
    seed: int,
    teacher_dir: str | Path | None = None,
    features_dir: str | Path | None = None,
) -> ModelSpec:
    """``spec`` with the models it builds on resolved for ``seed``: in a workflow config a
    distilled model's ``teacher`` and a similarity loss's ``features`` name other models,
    and seed k builds on their seed k, ``<dir>/seed<k>/best.pt``."""
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(dict(spec))
    options = copy.deepcopy(spec.options)
    if teacher_dir is not None:
        options["teacher"] = str(Path(teacher_dir) / f"seed{seed}" / "best.pt")
    if features_dir is not None:
        similarity = dict(options.get("similarity") or {})
        similarity["features"] = str(Path(features_dir) / f"seed{seed}" / "best.pt")
        options["similarity"] = similarity
    return ModelSpec(spec.name, spec.kind, options, spec.train, spec.data, spec.evaluate)
