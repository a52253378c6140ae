"""Results table of the synthetic-cluster family (Chen et al., NeurIPS 2022): test accuracy and
dispatch entropy of every model, per data setting, beside the paper's published figures.

Reads the metrics JSON of each trained model, setting and seed and writes, into one folder:

* ``table.csv`` (for scripts): one row per setting and model, columns :data:`CSV_COLUMNS`:
  seeds, mean and standard deviation (ddof 1; empty with one seed) of the test accuracy (%),
  of the dispatch entropy as published (nats; the last training forward pass, router noise
  on: the metrics' ``dispatch_entropy``) and of the same entropy at evaluation (the kept
  checkpoint's routing of the whole train store: ``dispatch_entropy_eval``; both empty for
  single CNNs), every number unrounded; then
  the published rows (``source`` = ``published``, ``citation`` filled, ``seeds`` = the runs
  the figure summarises, std as printed: ddof 0), each under the ``model`` of ours it
  matches, so ``(setting, model)`` joins ours to the paper's;
* ``table.md`` and ``table.html`` (for readers): one table per setting, our rows with the
  matching published row right under each, marked *published* and footnoted with its
  citation, and the definitions under the last table.

Published rows come from ``references.yaml`` (beside this module) (:func:`load_cluster_references`
refuses a row without a citation). A published row is matched to ours by what the model is
(kind, activation, filter count and, for a MoE, number of experts: :func:`model_key`),
never by a config's model name, and only where our test data were generated with the
paper's parameters for that setting (:func:`paper_setting`): the same distribution as the
paper's, not the same samples.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from smoe.core.atomic import write_text_atomic
from smoe.core.errors import InputError, one_line
from smoe.core.report.results import mean_std, read_json_result
from smoe.core.report.tables import Column, Table, html_page, markdown_table, mean_spread

REFERENCES = Path(__file__).with_name("references.yaml")
FAMILY = "clusters"
KINDS = ("cluster_single", "cluster_moe")
ACTIVATIONS = ("linear", "cubic")
CSV_COLUMNS = (
    "setting",
    "model",
    "label",
    "source",
    "seeds",
    "test_accuracy_mean",
    "test_accuracy_std",
    "dispatch_entropy_mean",
    "dispatch_entropy_std",
    "dispatch_entropy_eval_mean",
    "dispatch_entropy_eval_std",
    "citation",
)
OUTPUTS = {"csv": "table.csv", "markdown": "table.md", "html": "table.html"}
RESULT_KEYS = (
    "family",
    "setting",
    "model",
    "kind",
    "seed",
    "activation",
    "experts",
    "filters",
    "params",
    "test_noise",
    "metrics",
    "store",
)
"""What every cluster metrics JSON holds and what the table reads."""

COLUMNS = [
    Column("seeds"),
    Column("parameters", "", "count"),
    Column("test accuracy", "%", "percent"),
    Column("dispatch entropy", "nats, last training pass, as published", "plain"),
    Column("dispatch entropy at evaluation", "nats, train store, kept checkpoint", "plain"),
]
TITLE = "Synthetic clusters (Chen et al., NeurIPS 2022): test accuracy and dispatch entropy"
LEAD = (
    "Every configured model of the synthetic-cluster family, per data setting: test accuracy "
    "and the router's dispatch entropy over seeds, as the paper's official code defines it "
    "and, beside it, at evaluation. Under each of our rows, the paper's "
    "published figure for the same kind of model (same activation, filter count and number "
    "of experts), marked published and footnoted with its source."
)


# --- reading results ----------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterRun:
    """One metrics JSON of the cluster family, checked."""

    path: str
    setting: str
    model: str
    kind: str
    seed: int
    activation: str
    experts: int | None
    filters: int
    params: int
    test_noise: bool
    test_accuracy: float
    dispatch_entropy: float | None
    dispatch_entropy_eval: float | None
    store: str
    result: dict[str, Any] = field(repr=False, compare=False)

    @property
    def key(self) -> tuple:
        return model_key(self.kind, self.activation, self.filters, self.experts)

    @property
    def label(self) -> str:
        return model_label(self.kind, self.activation, self.filters, self.experts)


def model_key(kind: str, activation: str, filters: int, experts: int | None) -> tuple:
    """What a model is, for matching published rows: kind, activation, filters, experts
    (``None`` for single CNNs)."""
    return (kind, activation, int(filters), None if kind == "cluster_single" else int(experts))


def model_label(kind: str, activation: str, filters: int, experts: int | None) -> str:
    """A reader's name of a model, e.g. ``MoE nonlinear (8 experts, cubic)`` or ``single
    linear (80 filters)``: the paper's linear/nonlinear, the cubic activation named, a MoE's
    filters per expert named only when they are not the paper's 16."""
    nonlinear = activation == "cubic"
    word = "nonlinear" if nonlinear else "linear"
    suffix = ", cubic" if nonlinear else ""
    if kind == "cluster_moe":
        size = f"{experts} experts" if filters == 16 else f"{experts} experts of {filters} filters"
        return f"MoE {word} ({size}{suffix})"
    return f"single {word} ({filters} filters{suffix})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def check_run(result: Mapping[str, Any], name: str) -> ClusterRun:
    """A loaded cluster metrics dict as a :class:`ClusterRun`, or an InputError naming
    ``name`` (its file) and the offending key."""

    def bad(key: str, want: str) -> InputError:
        return InputError(
            f"metrics file {name}: {key} is {result_value(key)!r}, expected {want}; it is not "
            "a metrics file of the cluster family"
        )

    def result_value(key: str) -> Any:
        value: Any = result
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        return value

    missing = [key for key in RESULT_KEYS if key not in result]
    if missing:
        raise InputError(
            f"metrics file {name} is not a cluster metrics file: it lacks "
            f"{', '.join(map(repr, missing))}"
        )
    if result["family"] != FAMILY:
        raise InputError(
            f"metrics file {name} belongs to family {result['family']!r}, not {FAMILY!r}"
        )
    for key in ("setting", "model", "store"):
        if not isinstance(result[key], str) or not result[key].strip():
            raise bad(key, "a non-empty string")
    if result["kind"] not in KINDS:
        raise bad("kind", " or ".join(KINDS))
    if result["activation"] not in ACTIVATIONS:
        raise bad("activation", " or ".join(ACTIVATIONS))
    for key in ("seed", "filters", "params"):
        if not _is_int(result[key]) or result[key] < (0 if key == "seed" else 1):
            raise bad(key, "a non-negative integer" if key == "seed" else "a positive integer")
    experts = result["experts"]
    if result["kind"] == "cluster_moe" and not (_is_int(experts) and experts >= 1):
        raise bad("experts", "a positive integer for a MoE")
    if result["kind"] == "cluster_single" and experts is not None:
        raise bad("experts", "null for a single CNN")
    if not isinstance(result["test_noise"], bool):
        raise bad("test_noise", "true or false")
    metrics = result["metrics"]
    if not isinstance(metrics, Mapping):
        raise bad("metrics", "a mapping of metric names to numbers")
    if not _is_number(metrics.get("test_accuracy")):
        raise bad("metrics.test_accuracy", "a number (%)")
    entropy = metrics.get("dispatch_entropy")
    if entropy is not None and not _is_number(entropy):
        raise bad("metrics.dispatch_entropy", "a number (nats) or null")
    evaluated = metrics.get("dispatch_entropy_eval")
    if evaluated is not None and not _is_number(evaluated):
        raise bad("metrics.dispatch_entropy_eval", "a number (nats) or null")
    return ClusterRun(
        path=name,
        setting=result["setting"],
        model=result["model"],
        kind=result["kind"],
        seed=result["seed"],
        activation=result["activation"],
        experts=experts,
        filters=result["filters"],
        params=result["params"],
        test_noise=result["test_noise"],
        test_accuracy=float(metrics["test_accuracy"]),
        dispatch_entropy=None if entropy is None else float(entropy),
        dispatch_entropy_eval=None if evaluated is None else float(evaluated),
        store=result["store"],
        result=dict(result),
    )


def load_cluster_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """The cluster metrics JSON files as dicts, in the order given; a missing, unreadable or
    malformed file (not JSON, a key missing or of the wrong type, another family) raises an
    InputError naming it. For :func:`smoe.families.clusters.figures.dispatch_figure` too."""
    return [run.result for run in load_runs(paths)]


def load_runs(paths: Iterable[str | Path]) -> list[ClusterRun]:
    runs = []
    for path in paths:
        # keys are checked by check_run: metrics may hold nulls (no entropy for a single CNN)
        result = read_json_result(path)
        runs.append(check_run(result, repr(str(path))))
    if not runs:
        raise InputError("no metrics files given: nothing to tabulate")
    return runs


# --- published figures --------------------------------------------------------------------


def _mean_std(value: Any, where: str, key: str) -> tuple[float, float | None]:
    if _is_number(value):
        return float(value), None
    if isinstance(value, Mapping) and _is_number(value.get("mean")):
        std = value.get("std")
        if std is not None and not (_is_number(std) and std >= 0):
            raise InputError(f"{where}: {key}.std must be a number >= 0, got {std!r}")
        return float(value["mean"]), None if std is None else float(std)
    raise InputError(f"{where}: {key} must be a number or {{mean, std}}, got {value!r}")


def load_cluster_references(path: str | Path = REFERENCES) -> dict[str, Any]:
    """The published-figures file, every row checked: a citation, a setting, what the model
    is (kind, activation, filters, experts for a MoE), the runs and the test accuracy; no two
    rows for the same setting and model. Rows come back with ``key``, ``label`` and
    ``test_accuracy_mean/std``, ``dispatch_entropy_mean/std`` (None where not published)."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise InputError(
            f"published figures {str(path)!r} cannot be read ({exc.strerror or exc})"
        ) from exc
    except yaml.YAMLError as exc:
        raise InputError(
            f"published figures {str(path)!r} are not valid YAML ({one_line(exc)})"
        ) from exc
    if not isinstance(spec, dict) or not isinstance(spec.get("rows", []), list):
        raise InputError(f"published figures {str(path)!r}: expected a mapping with a rows list")
    rows = []
    seen: dict[tuple, int] = {}
    for index, row in enumerate(spec.get("rows") or []):
        where = f"{path}: rows[{index}]"
        if not isinstance(row, Mapping):
            raise InputError(f"{where} is not a mapping")
        if not str(row.get("citation") or "").strip():
            raise InputError(f"{where} ({row.get('setting')}, {row.get('kind')}) has no citation")
        if not isinstance(row.get("setting"), str):
            raise InputError(f"{where} has no setting")
        if row.get("kind") not in KINDS:
            raise InputError(f"{where}: kind must be one of {', '.join(KINDS)}")
        if row.get("activation") not in ACTIVATIONS:
            raise InputError(f"{where}: activation must be one of {', '.join(ACTIVATIONS)}")
        if not (_is_int(row.get("filters")) and row["filters"] >= 1):
            raise InputError(f"{where}: filters must be a positive integer")
        experts = row.get("experts")
        if row["kind"] == "cluster_moe" and not (_is_int(experts) and experts >= 1):
            raise InputError(f"{where}: a MoE row needs experts, a positive integer")
        if row["kind"] == "cluster_single" and experts is not None:
            raise InputError(f"{where}: a single-CNN row has no experts")
        if not (_is_int(row.get("runs")) and row["runs"] >= 1):
            raise InputError(f"{where}: runs must be a positive integer")
        if "test_accuracy" not in row:
            raise InputError(f"{where} has no published test_accuracy")
        accuracy = _mean_std(row["test_accuracy"], where, "test_accuracy")
        entropy = (
            _mean_std(row["dispatch_entropy"], where, "dispatch_entropy")
            if row.get("dispatch_entropy") is not None
            else (None, None)
        )
        key = model_key(row["kind"], row["activation"], row["filters"], experts)
        if (row["setting"], key) in seen:
            raise InputError(
                f"{where} repeats rows[{seen[row['setting'], key]}] (same setting and model)"
            )
        seen[row["setting"], key] = index
        rows.append(
            {
                **row,
                "key": key,
                "label": model_label(row["kind"], row["activation"], row["filters"], experts),
                "test_accuracy_mean": accuracy[0],
                "test_accuracy_std": accuracy[1],
                "dispatch_entropy_mean": entropy[0],
                "dispatch_entropy_std": entropy[1],
            }
        )
    notes = spec.get("notes") or []
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise InputError(f"published figures {str(path)!r}: notes must be a list of texts")
    return {**spec, "rows": rows, "notes": notes}


# --- data settings ------------------------------------------------------------------------


@dataclass(frozen=True)
class DataCheck:
    """What a setting's test data are: the paper setting they reproduce (None when not one
    of them, or when the store cannot be read), a description for the title and why
    published figures are not shown (``""`` when they are)."""

    paper: str | None
    description: str
    reason: str


def describe_setting(setting: Any) -> str:
    """``σ_p = 1, γ ~ U[0.5, 3]; 16,000 train / 16,000 test samples`` of a ClusterSetting."""
    low, high = setting.gamma
    return (
        f"σ_p = {setting.sigma_p:g}, γ ~ U[{low:g}, {high:g}]; "
        f"{setting.n_train:,} train / {setting.n_test:,} test samples"
    )


def paper_setting(stores: Sequence[str]) -> DataCheck:
    """Whether the test stores of one table setting hold data of one of the paper's settings
    (every generator parameter as the paper's; the seed is ours and may be anything)."""
    from smoe.families.clusters.data import SETTINGS
    from smoe.families.clusters.store import open_cluster_split

    names, descriptions = set(), set()
    for store in dict.fromkeys(stores):
        try:
            setting = open_cluster_split(store).setting
        except InputError as exc:
            return DataCheck(
                None,
                "",
                f"the test data {store!r} could not be read to check that they were generated "
                f"with the paper's parameters ({one_line(exc)})",
            )
        descriptions.add(describe_setting(setting))
        paper = SETTINGS.get(setting.name)
        if paper is None:
            return DataCheck(
                None, describe_setting(setting), f"{setting.name!r} is not a paper setting"
            )
        ours, theirs = setting.to_dict(), paper.to_dict()
        differ = [key for key in ours if ours[key] != theirs[key]]
        if differ:
            changes = ", ".join(
                f"{key} {_value(ours[key])} (paper {_value(theirs[key])})" for key in differ
            )
            return DataCheck(
                None,
                describe_setting(setting),
                f"our data differ from the paper's {setting.name}: {changes}",
            )
        names.add(setting.name)
    description = "; ".join(sorted(descriptions))
    if len(names) != 1:
        return DataCheck(None, description, f"the runs used data of settings {sorted(names)}")
    return DataCheck(names.pop(), description, "")


def _value(value: Any) -> str:
    if _is_int(value):
        return f"{value:,}"
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:g}" for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


# --- the table ----------------------------------------------------------------------------


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _order(key: tuple, model: str) -> tuple:
    kind, activation, filters, experts = key
    return (KINDS.index(kind), ACTIVATIONS.index(activation), experts or 0, filters, model)


def our_rows(runs: Sequence[ClusterRun]) -> list[dict[str, Any]]:
    """One row per setting and model (settings in natural order, models as the paper orders
    them: singles, then MoE; linear, then nonlinear; by size), with seeds, means and stds.

    Two files of the same setting, model and seed, or two files of one model that disagree
    on what the model is, raise an InputError naming both."""
    groups: dict[tuple[str, str], list[ClusterRun]] = {}
    for run in runs:
        group = groups.setdefault((run.setting, run.model), [])
        for other in group:
            if other.seed == run.seed:
                raise InputError(
                    f"metrics files {other.path} and {run.path} are both setting "
                    f"{run.setting!r}, model {run.model!r}, seed {run.seed}: give each run once"
                )
            if other.key != run.key:
                raise InputError(
                    f"metrics files {other.path} and {run.path} are both setting "
                    f"{run.setting!r}, model {run.model!r}, but describe different models "
                    f"({other.label} and {run.label})"
                )
        group.append(run)
    rows = []
    for (setting, model), group in groups.items():
        first = group[0]
        accuracy = mean_std([r.test_accuracy for r in group])
        entropy = mean_std([r.dispatch_entropy for r in group if r.dispatch_entropy is not None])
        evaluated = mean_std(
            [r.dispatch_entropy_eval for r in group if r.dispatch_entropy_eval is not None]
        )
        rows.append(
            {
                "setting": setting,
                "model": model,
                "label": first.label,
                "source": "ours",
                "seeds": len(group),
                "test_accuracy_mean": accuracy[0],
                "test_accuracy_std": accuracy[1],
                "dispatch_entropy_mean": entropy[0],
                "dispatch_entropy_std": entropy[1],
                "dispatch_entropy_eval_mean": evaluated[0],
                "dispatch_entropy_eval_std": evaluated[1],
                "citation": "",
                "key": first.key,
                "params": first.params,
                "runs": group,
            }
        )
    rows.sort(key=lambda row: (_natural(row["setting"]), _order(row["key"], row["model"])))
    return rows


def published_row(reference: Mapping[str, Any], ours: Mapping[str, Any]) -> dict[str, Any]:
    """A published row placed under ``ours`` (same setting and model name in the CSV)."""
    return {
        "setting": ours["setting"],
        "model": ours["model"],
        "label": reference["label"],
        "source": "published",
        "seeds": reference["runs"],
        "test_accuracy_mean": reference["test_accuracy_mean"],
        "test_accuracy_std": _nan(reference["test_accuracy_std"]),
        "dispatch_entropy_mean": _nan(reference["dispatch_entropy_mean"]),
        "dispatch_entropy_std": _nan(reference["dispatch_entropy_std"]),
        "dispatch_entropy_eval_mean": math.nan,  # the paper gives only its own definition
        "dispatch_entropy_eval_std": math.nan,
        "citation": " ".join(str(reference["citation"]).split()),
        "key": reference["key"],
        "params": None,
    }


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _cell(mean: float, std: float, style: str) -> str:
    """``mean ± std`` (the mean alone without spread); ``style`` ``entropy`` prints three
    decimals, as the paper does, any other is :func:`smoe.core.report.tables.mean_spread`'s."""
    if math.isnan(mean):
        return ""
    if style == "entropy":
        return f"{mean:.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}")
    return mean_spread(mean, None if math.isnan(std) else std, style)


def _cells(row: Mapping[str, Any]) -> list[str]:
    return [
        str(row["seeds"]),
        "" if row.get("params") is None else f"{row['params']:,}",
        _cell(row["test_accuracy_mean"], row["test_accuracy_std"], "percent"),
        _cell(row["dispatch_entropy_mean"], row["dispatch_entropy_std"], "entropy"),
        _cell(row["dispatch_entropy_eval_mean"], row["dispatch_entropy_eval_std"], "entropy"),
    ]


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def routing_note(runs: Sequence[ClusterRun]) -> str:
    """Test-time routing as the metrics files record it (``test_noise``)."""
    moe = [run for run in runs if run.kind == "cluster_moe"]
    if not moe:
        return "Test-time routing: no MoE in this table (single CNNs have no router)."
    noisy = [run for run in moe if run.test_noise]
    base = (
        "Test-time routing: every test sample goes to the expert of the largest router score "
        "(top-1); the U[0, 1) noise added to the scores in training "
    )
    if not noisy:
        return base + (
            f"is off at test time in all {len(moe)} MoE runs here (test_noise false in "
            "their metrics files), whereas the paper's code keeps it on."
        )
    if len(noisy) == len(moe):
        return base + (
            f"stays on at test time in all {len(moe)} MoE runs here (test_noise true in their "
            "metrics files), as in the paper's code."
        )
    which = sorted({f"{run.model} ({run.setting})" for run in noisy}, key=_natural)
    return base + (
        f"is off at test time except in {len(noisy)} of the {len(moe)} MoE runs, those of "
        f"{_join(which)} (test_noise true in their metrics files), where it stays on as in "
        "the paper's code."
    )


def _training_part(runs: Sequence[ClusterRun]) -> str:
    """What the runs trained on: ``our training part, the 14,400 of the train split's 16,000
    samples left after the 10 % validation carve (the official code: all of them)``."""
    parts = {
        (run.result.get("train_samples"), run.result.get("val_samples"))
        for run in runs
        if run.kind == "cluster_moe"
    }
    official = "the official code routes the whole train split"
    if len(parts) == 1:
        train, val = parts.pop()
        if _is_int(train) and _is_int(val) and train + val > 0:
            share = 100 * val / (train + val)
            return (
                f"our training part: the {train:,} of the train split's {train + val:,} samples "
                f"left after the {share:.3g} % validation carve ({official})"
            )
    return f"our training part: the train split less its validation carve ({official})"


def training_note() -> str:
    """How the models were trained by default, and where that differs from the official
    code."""
    return (
        "Training, by default (clusters.train), as the official code trains each kind, full "
        "batch: the MoE's experts by normalised gradient descent (step 1e-3), its router by "
        "gradient descent (0.1), on the cross-entropy of the softmax of its output, at most "
        "501 epochs, stopping before an epoch's step when that epoch's loss is not a new "
        "minimum and either exceeds the minimum + 0.02 or is <= 0.314; a single CNN with Adam "
        "(3e-3 linear, 1e-2 cubic; weight decay 5e-4) on the plain cross-entropy of its "
        "logits, at most 801 epochs, stopping after epoch 500 in the same way when the loss "
        "exceeds its minimum + 0.02. Where ours differs from the official code: we hold a "
        "validation part out of the train split (clusters.data.val_fraction), train on the "
        "rest and keep the epoch of best validation accuracy, where the official code trains "
        "on the whole train split and tests the weights its last epoch left; our router "
        "noise comes from its own seeded stream, where the official code draws it from the "
        "generator that drew the initial weights; and by default we route without noise at "
        "test time (below)."
    )


def general_notes(
    runs: Sequence[ClusterRun],
    references: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]] = (),
) -> list[str]:
    """The definitions under the last table; the published figures' own notes when any
    published row is shown (``rows``: the CSV rows)."""
    clusters = sorted(
        {
            int(run.result["dispatch"]["clusters"])
            for run in runs
            if isinstance(run.result.get("dispatch"), Mapping)
            and _is_int(run.result["dispatch"].get("clusters"))
        }
    )
    k = clusters[0] if len(clusters) == 1 else 4
    notes = [
        "Test accuracy: percentage of the test split's samples whose larger logit is their "
        "label, for the checkpoint each run kept (best_epoch in its metrics file): the epoch "
        "of best accuracy on the validation part held out of the train split.",
        "Dispatch entropy: sum over experts m of (n_m / N) · H(cluster | routed to expert m), "
        "natural log (n_m of the N samples routed to expert m): 0 when every expert receives "
        f"one cluster only, ln {k} = {math.log(k):.3f} when every expert receives the {k} "
        "clusters in equal shares. The column 'dispatch entropy' is the published "
        "definition, as the official code computes it: on the training forward pass of the "
        "last epoch run (router noise on, before that epoch's update), over "
        f"{_training_part(runs)}. "
        "The column 'dispatch entropy at evaluation' is the same formula for the kept "
        "checkpoint routing every sample of the train store (its validation part included) "
        "as at test time (below). Single CNNs have no router, so no entropy.",
        training_note(),
        routing_note(runs),
        "With several seeds a cell of ours reads mean ± standard deviation over the seeds "
        "(ddof 1); with one seed the value alone. For a published row the seeds column gives "
        "the runs the figure summarises.",
        "A published row sits under the row of ours with the same kind of model (activation, "
        "filter count, number of experts), whatever the model is called; it is shown only "
        "where our data were generated with the paper's parameters for that setting "
        "(the same distribution, drawn with our own seed: not the paper's samples).",
    ]
    if any(row["source"] == "published" for row in rows):
        notes += [" ".join(note.split()) for note in references.get("notes", [])]
    return notes


def build(
    runs: Sequence[ClusterRun],
    references: Mapping[str, Any],
    checks: Mapping[str, DataCheck],
) -> tuple[list[dict[str, Any]], list[Table]]:
    """The CSV rows (ours, then the published ones) and one Table per setting."""
    ours = our_rows(runs)
    published: dict[tuple[str, tuple], Mapping[str, Any]] = {
        (row["setting"], row["key"]): row for row in references["rows"]
    }
    settings = list(dict.fromkeys(row["setting"] for row in ours))
    csv_rows = list(ours)
    tables = []
    for setting in settings:
        check = checks[setting]
        title = f"Setting {setting}"
        if check.paper is not None and check.paper != setting:
            title += f" (the paper's {check.paper})"
        if check.description:
            title += f": {check.description}"
        table = Table(title, list(COLUMNS))
        shown = 0
        for row in (r for r in ours if r["setting"] == setting):
            table.add(row["label"], "ours", _cells(row))
            reference = (
                published.get((check.paper, row["key"])) if check.paper is not None else None
            )
            if reference is not None:
                extra = published_row(reference, row)
                csv_rows.append(extra)
                table.add(extra["label"], "published", _cells(extra), extra["citation"])
                shown += 1
        if check.paper is None:
            table.notes.append(f"No published figures shown for {setting}: {check.reason}.")
        elif not shown:
            table.notes.append(
                f"No published figure of the paper's {check.paper} matches a model of ours."
            )
        tables.append(table)
    tables[-1].notes.extend(general_notes(runs, references, csv_rows))
    return csv_rows, tables


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    frame = pd.DataFrame([{column: row[column] for column in CSV_COLUMNS} for row in rows])
    return frame.to_csv(index=False, columns=list(CSV_COLUMNS))


def cluster_table(
    paths: Iterable[str | Path], out_dir: str | Path, references: Path = REFERENCES
) -> dict[str, Path]:
    """Write table.csv, table.md and table.html into ``out_dir``; returns their paths by
    ``csv``, ``markdown`` and ``html``.

    Every metrics file is checked before anything is written (an InputError names a missing
    or malformed one); the test store of each setting is opened to decide whether the
    paper's figures apply (:func:`paper_setting`)."""
    runs = load_runs(paths)
    spec = load_cluster_references(references)
    checks = {}
    for setting in dict.fromkeys(run.setting for run in runs):
        checks[setting] = paper_setting([run.store for run in runs if run.setting == setting])
    rows, tables = build(runs, spec, checks)
    out_dir = Path(out_dir)
    outputs = {key: out_dir / name for key, name in OUTPUTS.items()}
    csv = csv_text(rows)
    write_text_atomic(outputs["csv"], csv)
    markdown = "\n".join([f"# {TITLE}", "", LEAD, "", *(markdown_table(t) for t in tables)])
    write_text_atomic(outputs["markdown"], markdown)
    write_text_atomic(
        outputs["html"],
        html_page(TITLE, tables, lead=LEAD, downloads={"table.csv": csv.encode()}),
    )
    return outputs
