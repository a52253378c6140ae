"""The paper's orderings of the gated family, checked on our rows: what holds, what does not
and by how much (the second table of ``smoe gated-table``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from smoe.core.report.tables import Column, Table

SINGLE = "gated_single"
HOLDS, FAILS, UNCHECKED = "holds", "does not hold", "not checked"

ORDERING_TITLE = "Published orderings on our data"


ORDERING_COLUMNS = [
    Column("compared", "", "text"),
    Column("verdict", "", "text"),
    Column("our numbers", "", "text"),
]


VERDICT_MARKS = {HOLDS: "✓", FAILS: "✗", UNCHECKED: "–"}
"""Put before a verdict, so a failed ordering stands out in a column of them."""


@dataclass(frozen=True)
class OrderingCheck:
    """One ordering of the paper checked on our rows: ``status`` is :data:`HOLDS`,
    :data:`FAILS` or :data:`UNCHECKED`; ``detail`` gives the numbers (or what is missing);
    ``why`` says what failed and ``shortfall`` by how much (in the failing quantity's
    unit, negative; None unless it fails)."""

    ordering: str
    compared: str
    status: str
    detail: str
    shortfall: float | None = None
    why: str = ""

    @property
    def verdict(self) -> str:
        """``✗ does not hold: top-2 -0.50 points against top-1``: the mark, the status and
        what failed, so a failing row stands out in a column of verdicts."""
        text = f"{VERDICT_MARKS[self.status]} {self.status}"
        return f"{text}: {self.why}" if self.why else text


def row_number(row: Mapping[str, Any], key: str) -> float:
    value = row.get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value


def _std(row: Mapping[str, Any], key: str) -> float:
    """A row's std, 0 where there is none (one seed)."""
    value = row_number(row, f"{key}_std")
    return 0.0 if math.isnan(value) else value


def _experts(row: Mapping[str, Any]) -> int | None:
    value = row.get("experts")
    return None if value is None or value == "" else int(value)


def _named(row: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """A row's label, with its config name and E where other rows share the label."""
    twins = [r for r in rows if r.get("label") == row.get("label")]
    if len(twins) < 2:
        return str(row["label"])
    return f"{row['label']} [{row.get('variant')}, E = {_experts(row)}]"


def _pairs(rows: Sequence[Mapping[str, Any]], a: str, b: str) -> list[tuple[Mapping, Mapping]]:
    """Every (row labelled ``a``, row labelled ``b``) of the same number of experts."""
    return [
        (ra, rb)
        for ra in rows
        if ra.get("label") == a
        for rb in rows
        if rb.get("label") == b and _experts(ra) == _experts(rb)
    ]


IMPORTANCE_ORDERING = "(a) L_imp raises H_u toward log2 E without lowering accuracy"


TOP_K_ORDERING = "(b) top-2 at least as accurate as top-1"


SINGLE_ORDERING = "(c) every MoE variant above the single model (one expert)"


COLLAPSE_ORDERING = "(d) top-1's gate not collapsed onto one expert (H_u > 0.5 bits)"


COLLAPSE_BITS = 0.5


def _missing(ordering: str, a: str, b: str, rows: Sequence[Mapping[str, Any]]) -> OrderingCheck:
    labels = {row.get("label") for row in rows}
    absent = [label for label in (a, b) if label not in labels]
    why = (
        f"no model labelled {' or '.join(repr(x) for x in absent)}"
        if absent
        else "no two of the same number of experts"
    )
    return OrderingCheck(ordering, f"{a} vs {b}", UNCHECKED, why)


def _importance_check(
    imp: Mapping[str, Any], base: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]
) -> OrderingCheck:
    compared = f"{_named(imp, rows)} vs {_named(base, rows)}"
    experts = _experts(imp)
    hu_imp, hu_base = row_number(imp, "usage_entropy_mean"), row_number(base, "usage_entropy_mean")
    acc_imp, acc_base = (
        row_number(imp, "test_accuracy_mean"),
        row_number(base, "test_accuracy_mean"),
    )
    if math.isnan(hu_imp) or math.isnan(hu_base):
        return OrderingCheck(IMPORTANCE_ORDERING, compared, UNCHECKED, "H_u missing")
    ceiling = f"; log2 E = {math.log2(experts):.2f}" if experts else ""
    d_hu, d_acc = hu_imp - hu_base, acc_imp - acc_base
    allowed = max(_std(imp, "test_accuracy"), _std(base, "test_accuracy"))
    numbers = (
        f"H_u {hu_base:.2f} → {hu_imp:.2f} bits ({d_hu:+.2f}{ceiling}); accuracy "
        f"{acc_base:.2f} → {acc_imp:.2f} % ({d_acc:+.2f} points, allowed down to "
        f"{-allowed:+.2f})"
    )
    failures, shortfall = [], None
    if d_hu <= 0:
        failures.append(f"H_u not raised ({d_hu:+.2f} bits)")
        shortfall = d_hu
    if d_acc < -allowed:
        failures.append(f"accuracy lowered {d_acc + allowed:+.2f} points beyond the spread")
        shortfall = d_acc + allowed if shortfall is None else shortfall
    if failures:
        why = "; ".join(failures)
        return OrderingCheck(IMPORTANCE_ORDERING, compared, FAILS, numbers, shortfall, why)
    return OrderingCheck(IMPORTANCE_ORDERING, compared, HOLDS, numbers)


def _importance_checks(rows: Sequence[Mapping[str, Any]]) -> list[OrderingCheck]:
    """(a) on expectation, and on top-2 where either top-2 model is there."""
    checks = []
    labels = {row.get("label") for row in rows}
    for imp, base in (("expectation + L_imp", "expectation"), ("top-2 + L_imp", "top-2")):
        if base == "top-2" and not labels & {imp, base}:
            continue  # the paper's second comparison, made only when one side was run
        pairs = _pairs(rows, imp, base)
        if not pairs:
            checks.append(_missing(IMPORTANCE_ORDERING, imp, base, rows))
        checks += [_importance_check(a, b, rows) for a, b in pairs]
    return checks


def _top_k_checks(rows: Sequence[Mapping[str, Any]]) -> list[OrderingCheck]:
    pairs = _pairs(rows, "top-2", "top-1")
    if not pairs:
        return [_missing(TOP_K_ORDERING, "top-2", "top-1", rows)]
    checks = []
    for two, one in pairs:
        a2, a1 = row_number(two, "test_accuracy_mean"), row_number(one, "test_accuracy_mean")
        diff = a2 - a1
        numbers = f"accuracy {a2:.2f} % vs {a1:.2f} % ({diff:+.2f} points)"
        compared = f"{_named(two, rows)} vs {_named(one, rows)}"
        if diff >= 0:
            checks.append(OrderingCheck(TOP_K_ORDERING, compared, HOLDS, numbers))
        else:
            why = f"top-2 {diff:+.2f} points against top-1"
            checks.append(OrderingCheck(TOP_K_ORDERING, compared, FAILS, numbers, diff, why))
    return checks


def _single_checks(rows: Sequence[Mapping[str, Any]]) -> list[OrderingCheck]:
    """(c): every MoE row against the single model(s) of its E, failures listed first."""
    singles = [row for row in rows if row.get("kind") == SINGLE and row.get("label") == "single"]
    moes = [row for row in rows if row.get("kind") != SINGLE]
    if not singles or not moes:
        what = "no single model" if not singles else "no MoE model"
        return [OrderingCheck(SINGLE_ORDERING, "MoE variants vs single", UNCHECKED, what)]
    sizes = {_experts(single) for single in singles}
    others = [row for row in moes if _experts(row) not in sizes]
    aside = (
        "; not compared (no single of their size): "
        + ", ".join(f"{_named(row, rows)} (E = {_experts(row)})" for row in others)
        if others
        else ""
    )
    checks = []
    for single in singles:
        experts = _experts(single)
        same = [row for row in moes if _experts(row) == experts]
        base = row_number(single, "test_accuracy_mean")
        compared = f"{len(same)} MoE variant(s) of E = {experts} vs {_named(single, rows)}"
        if not same:
            checks.append(OrderingCheck(SINGLE_ORDERING, compared, UNCHECKED, "no MoE of this E"))
            continue
        gaps = [(row, row_number(row, "test_accuracy_mean") - base) for row in same]
        below = sorted((item for item in gaps if not item[1] > 0), key=lambda item: item[1])
        listed = ", ".join(f"{_named(row, rows)} {gap:+.2f}" for row, gap in below)
        if below:
            why = f"{len(below)} of {len(same)} not above: {listed} points"
            numbers = f"single {base:.2f} %; " + ", ".join(
                f"{_named(row, rows)} {row_number(row, 'test_accuracy_mean'):.2f} %" for row in same
            )
            checks.append(
                OrderingCheck(SINGLE_ORDERING, compared, FAILS, numbers + aside, below[0][1], why)
            )
        else:
            row, gap = min(gaps, key=lambda item: item[1])
            numbers = (
                f"single {base:.2f} %; every MoE above, the closest {_named(row, rows)} "
                f"{row_number(row, 'test_accuracy_mean'):.2f} % ({gap:+.2f} points)"
            )
            checks.append(OrderingCheck(SINGLE_ORDERING, compared, HOLDS, numbers + aside))
    return checks


def _collapse_checks(rows: Sequence[Mapping[str, Any]]) -> list[OrderingCheck]:
    """(d): every top-1 row's expert usage above :data:`COLLAPSE_BITS`."""
    checks = []
    for row in rows:
        if row.get("label") != "top-1":
            continue
        usage = row_number(row, "usage_entropy_mean")
        numbers = f"H_u {usage:.2f} bits (log2 E = {math.log2(_experts(row) or 1):.2f})"
        compared = _named(row, rows)
        if usage > COLLAPSE_BITS:
            checks.append(OrderingCheck(COLLAPSE_ORDERING, compared, HOLDS, numbers))
        else:
            gap = usage - COLLAPSE_BITS
            why = f"H_u {usage:.2f} bits: the gate sends nearly every sample to one expert"
            checks.append(OrderingCheck(COLLAPSE_ORDERING, compared, FAILS, numbers, gap, why))
    return checks or [_missing(COLLAPSE_ORDERING, "top-1", "top-1", rows)]


def gated_orderings(rows: Sequence[Mapping[str, Any]]) -> list[OrderingCheck]:
    """The paper's orderings checked on our rows (:func:`our_rows`, or ``table.csv`` rows
    with ``kind`` and ``experts`` added), comparing only models of the same E:

    (a) importance regularisation raises H_u toward log2 E without lowering accuracy:
        ``expectation + L_imp`` against ``expectation`` (and ``top-2 + L_imp`` against
        ``top-2`` when either was run); holds when the mean H_u is higher and the mean
        accuracy is not lower by more than the larger of the two accuracy stds;
    (b) ``top-2`` at least as accurate as ``top-1`` (mean accuracy);
    (c) every MoE variant (distilled and EM included) above the single model (one expert,
        label ``single``) of the same E: a higher mean accuracy; the failures are listed,
        worst first;
    (d) the top-1 gate not collapsed: its mean H_u above :data:`COLLAPSE_BITS`.

    A comparison whose labels were not run is :data:`UNCHECKED`, with what is missing."""
    return [
        *_importance_checks(rows),
        *_top_k_checks(rows),
        *_single_checks(rows),
        *_collapse_checks(rows),
    ]


ORDERING_NOTES = [
    "(a) holds when the mean H_u of the model with L_imp is higher than without it and its "
    "mean accuracy is not lower by more than the larger of the two models' accuracy stds "
    "(0 with one seed each); (b) when top-2's mean accuracy is not below top-1's; (c) when "
    "every MoE's mean accuracy is higher than the one-expert single model's; (d) when "
    "top-1's mean H_u exceeds 0.5 bits. Only models with the same number of experts are "
    "compared; a single model counts with the E of its table (its options' experts).",
]


def ordering_table(checks: Sequence[OrderingCheck]) -> Table:
    """The orderings as a table: one row per comparison, the verdict saying by how much a
    failing one fails."""
    table = Table(ORDERING_TITLE, list(ORDERING_COLUMNS), first_header="ordering")
    for check in checks:
        table.add(check.ordering, "ours", [check.compared, check.verdict, check.detail])
    failed = sum(check.status == FAILS for check in checks)
    unchecked = sum(check.status == UNCHECKED for check in checks)
    table.notes.append(
        f"Of {len(checks)} comparisons: {len(checks) - failed - unchecked} hold, {failed} do "
        f"not hold, {unchecked} not checked."
    )
    table.notes.extend(ORDERING_NOTES)
    return table
