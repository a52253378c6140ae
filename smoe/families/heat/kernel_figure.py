"""The heat family's kernels figure: each SMoE expert's learned 3x3 kernel beside the true
stencil of the region type the expert was matched to, the pairs chosen by functions tests can
check."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smoe.core.errors import InputError
from smoe.core.report.figures import MAX_HEIGHT, MAX_WIDTH, new_figure, save_figure, viewer_size
from smoe.families.heat.figures import (
    KERNEL_EXTRA,
    KERNEL_FIXED,
    KERNEL_KEYS,
    _blank,
    _check_routing,
    _described,
    _sources,
    run_title,
)


@dataclass(frozen=True)
class KernelPair:
    """An expert's learned kernel and the true stencil of its matched type (None if none)."""

    expert: int
    region: int | None
    kernel: np.ndarray
    stencil: np.ndarray | None

    @property
    def error(self) -> float:
        if self.stencil is None:
            return math.nan
        return float(np.abs(self.kernel - self.stencil).max())


def kernel_pairs(routing: Mapping[str, Any]) -> list[KernelPair]:
    """Each expert (by index) with the stencil of the region type it was matched to."""
    kernels = np.asarray(routing["kernels"], dtype=np.float64)
    stencils = np.asarray(routing["stencils"], dtype=np.float64)
    matching = {int(e): int(t) for e, t in routing["expert_to_type"].items()}
    pairs = []
    for expert, kernel in enumerate(kernels):
        region = matching.get(expert)
        stencil = stencils[region] if region is not None else None
        pairs.append(KernelPair(expert, region, kernel, stencil))
    return pairs


def _cell_text(value: float) -> str:
    """Four decimals, the precision of the stencils; a rounded-away sign is dropped."""
    text = f"{value:.4f}"
    return text[1:] if text.strip("-0.") == "" and text.startswith("-") else text


def _kernel_panel(ax, values: np.ndarray, low: float, high: float, fontsize: float) -> None:
    image = ax.imshow(values, cmap="Blues", vmin=low, vmax=high, interpolation="nearest")
    for (r, c), value in np.ndenumerate(values):
        shade = image.cmap(image.norm(value))
        dark = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2] < 0.5
        ax.text(
            c,
            r,
            _cell_text(value),
            ha="center",
            va="center",
            fontsize=fontsize,
            color="white" if dark else "black",
        )
    ax.set_xticks([])
    ax.set_yticks([])


@dataclass(frozen=True)
class KernelCell:
    """One panel of the kernels table: a 3x3 array (None: empty) and its title."""

    values: np.ndarray | None
    title: str = ""


@dataclass(frozen=True)
class KernelTable:
    """The kernels figure before drawing: a header row of true stencils, then one row per
    run with each expert under the type it was matched to (unmatched experts last)."""

    row_labels: list[str]
    column_labels: list[str]
    cells: list[list[KernelCell]]


def kernel_table(runs: Sequence[Mapping[str, Any]]) -> KernelTable:
    """Every run's experts aligned by matched region type under the true stencils.

    The true stencils are the same for every run of one workflow, so they are drawn once;
    runs whose stencils differ (other data) raise an InputError.
    """
    stencils = np.asarray(runs[0]["routing"]["stencils"], dtype=np.float64)
    for result in runs[1:]:
        other = np.asarray(result["routing"]["stencils"], dtype=np.float64)
        if other.shape != stencils.shape or not np.allclose(other, stencils):
            raise InputError(
                f"kernels figure: {run_title(result)} and {run_title(runs[0])} have different "
                "true stencils (other diffusivities): draw them in separate figures"
            )
    types = len(stencils)
    per_run = [kernel_pairs(result["routing"]) for result in runs]
    unmatched = max(sum(p.region is None for p in pairs) for pairs in per_run)
    cells = [[KernelCell(stencil) for stencil in stencils] + [KernelCell(None)] * unmatched]
    row_labels = ["true stencil"]
    for result, pairs in zip(runs, per_run, strict=True):
        by_type = {p.region: p for p in pairs if p.region is not None}
        row = [
            KernelCell(
                by_type[t].kernel, f"expert {by_type[t].expert}: |err| {by_type[t].error:.2g}"
            )
            if t in by_type
            else KernelCell(None, "no expert")
            for t in range(types)
        ]
        spare = [p for p in pairs if p.region is None]
        row += [KernelCell(p.kernel, f"expert {p.expert}") for p in spare]
        row += [KernelCell(None)] * (unmatched - len(spare))
        cells.append(row)
        error = result["routing"].get("kernel_max_abs_error")
        shown = "n/a" if error is None else f"{error:.2g}"
        row_labels.append(f"{run_title(result)}\nmax |err| {shown}")
    column_labels = [f"type {t}" for t in range(types)] + ["unmatched"] * unmatched
    return KernelTable(row_labels, column_labels, cells)


def _kernel_limits(column: Sequence[KernelCell]) -> tuple[float, float]:
    """One colour scale per column of the table: a type's stencil and its kernels compare."""
    arrays = [cell.values for cell in column if cell.values is not None]
    if not arrays:
        return 0.0, 1.0
    low = min(0.0, *(float(a.min()) for a in arrays))
    high = max(float(a.max()) for a in arrays)
    return low, max(high, low + 1e-12)


def kernel_runs(
    runs: Sequence[Mapping[str, Any]], sources: Sequence[str | Path] | None = None
) -> list[Mapping[str, Any]]:
    """The results with learned 3x3 kernels (SMoE models); a kernels section without the
    stencils or the matching raises an InputError naming its file or model and seed."""
    runs = list(runs)
    selected = []
    for result, name in zip(runs, _sources(runs, sources), strict=True):
        routing = result.get("routing")
        if isinstance(routing, Mapping) and routing.get("kernels"):
            _check_routing(result, name, KERNEL_KEYS)
            selected.append(result)
    return selected


def kernels_figure(
    runs: list[dict[str, Any]],
    out: str | Path,
    sources: Sequence[str | Path] | None = None,
) -> tuple[Path, Path]:
    """Each SMoE run's learned 3x3 expert kernels above the true stencils they were matched to.

    Pairing uses the run's ``expert_to_type``, so a permuted matching still puts each
    kernel beside the right stencil; runs without 3x3 kernels (or non-SMoE runs) are skipped,
    and when none has them an InputError names the inputs (``sources``, as for
    :func:`routing_figure`).
    """
    names = _sources(runs, sources)
    runs = kernel_runs(runs, sources)
    if not runs:
        raise InputError(
            f"kernels figure: none of the {_described(names, sources)} has learned 3x3 "
            "kernels (only SMoE models whose last layer has 3x3 experts do); nothing to draw"
        )
    table = kernel_table(runs)
    limits = [_kernel_limits(column) for column in zip(*table.cells, strict=True)]
    rows, cols = len(table.cells), len(table.cells[0])
    transpose = rows > cols  # many runs: runs as columns, so the figure grows wide
    shown_rows, shown_cols = (cols, rows) if transpose else (rows, cols)
    side = min(
        1.5,
        (MAX_WIDTH - KERNEL_FIXED[0]) / shown_cols - KERNEL_EXTRA[0],
        (MAX_HEIGHT - KERNEL_FIXED[1]) / shown_rows - KERNEL_EXTRA[1],
    )
    fontsize = min(6.5, 6.5 * side / 1.25)  # "-0.0012" three times across a panel
    fig = new_figure(
        *viewer_size(
            shown_cols * (side + KERNEL_EXTRA[0]) + KERNEL_FIXED[0],
            shown_rows * (side + KERNEL_EXTRA[1]) + KERNEL_FIXED[1],
        ),
        layout="compressed",
    )
    axes = fig.subplots(shown_rows, shown_cols, squeeze=False)
    side_labels, top_labels = (
        (table.column_labels, table.row_labels)
        if transpose
        else (table.row_labels, table.column_labels)
    )
    for r, row in enumerate(table.cells):
        for c, cell in enumerate(row):
            ax = axes[c, r] if transpose else axes[r, c]
            if cell.values is None:
                _blank(ax, cell.title)
                title = ""
            else:
                _kernel_panel(ax, cell.values, *limits[c], fontsize)
                title = cell.title
            top = (c if transpose else r) == 0
            header = top_labels[r if transpose else c]
            ax.set_title(
                f"{header}\n{title}" if top and title else header if top else title, fontsize=7
            )
    for ax, label in zip(axes[:, 0], side_labels, strict=True):
        ax.set_ylabel(label, fontsize=7.5)
    fig.suptitle(
        "learned 3x3 kernels of the last SMoE layer under the true stencil of the region type "
        "each expert was matched to\n|err|: largest absolute difference to that stencil; "
        "colours shared per type",
        fontsize=8.5,
    )
    return save_figure(fig, out)
