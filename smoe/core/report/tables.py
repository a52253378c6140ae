"""Result tables as data, rendered once as Markdown (for the terminal and GitHub) and once as a
standalone HTML page (for `snakemake --report`, whose viewer shows HTML inline but offers a CSV
only as a download).

A table is a list of columns (each knows its header, unit and how to print a number) and a list
of rows (each knows where it comes from: ``ours``, ``reference`` or ``published``). Spread is
printed only where it exists: a row evaluated with one seed shows its mean alone, never
"± nan" or "± 0". Published rows carry a footnote that points at their citation.

Nothing here knows which experiment a table belongs to; ``smoe.families.heat.aggregate`` (heat) and
the other families build their :class:`Table` objects and call :func:`html_page` /
:func:`markdown_table`.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

SOURCES = ("ours", "reference", "published")
SOURCE_NOTES = {
    "reference": "analytic predictor evaluated by this workflow on the same test split "
    "(nothing learned)",
    "published": "figure printed in a paper, not a run of this workflow",
}


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_number(value: float, style: str) -> str:
    """One number as a reader wants it: ``percent`` with two decimals, ``sci`` with three
    significant digits, ``count`` with thousands separators, ``seconds`` whole above 10 s,
    ``plain`` with four significant digits."""
    if _missing(value):
        return ""
    value = float(value)
    if style == "percent":
        return f"{value:.2f}"
    if style == "sci":
        return "0" if value == 0 else f"{value:.2e}"
    if style == "count":
        return f"{value:,.0f}"
    if style == "seconds":
        return f"{value:.0f}" if abs(value) >= 10 else f"{value:.1f}"
    if style == "plain":
        return f"{value:.4g}"
    raise ValueError(f"unknown number style {style!r}")


def mean_spread(mean: float, std: float | None, style: str) -> str:
    """``mean ± std`` in the column's style, or the mean alone when there is no spread."""
    text = format_number(mean, style)
    if text and not _missing(std):
        text += " ± " + format_number(std, style)
    return text


@dataclass(frozen=True)
class Column:
    """A column: header text, unit (shown under the header; '' for none) and number style
    (``text``: words, left-aligned and wrapped in HTML, where the other styles are numbers
    aligned right)."""

    header: str
    unit: str = ""
    style: str = "plain"
    group: str = ""  # a spanning header above consecutive columns of the same group


@dataclass
class Row:
    label: str
    source: str
    cells: list[str]
    citation: str = ""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"row {self.label!r}: source {self.source!r} not in {SOURCES}")
        if self.source == "published" and not self.citation.strip():
            raise ValueError(f"published row {self.label!r} has no citation")


@dataclass
class Table:
    title: str
    columns: list[Column]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    first_header: str = "model"

    def citations(self) -> list[str]:
        """The distinct citations of the published rows, in order of appearance."""
        return list(dict.fromkeys(row.citation for row in self.rows if row.source == "published"))

    def add(self, label: str, source: str, cells: Sequence[str], citation: str = "") -> None:
        if len(cells) != len(self.columns):
            raise ValueError(
                f"row {label!r} has {len(cells)} cells for {len(self.columns)} columns"
            )
        self.rows.append(Row(label, source, list(cells), citation))


# --- Markdown -----------------------------------------------------------------------------


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(table: Table) -> str:
    """The table as GitHub Markdown: title, table, the notes and the published citations."""
    headers = [table.first_header] + [
        (f"{c.group} " if c.group else "") + c.header + (f" ({c.unit})" if c.unit else "")
        for c in table.columns
    ]
    citations = table.citations()
    lines = [f"## {table.title}", "", "| " + " | ".join(map(_md_escape, headers)) + " |"]
    lines.append("|" + "---|" * len(headers))
    for row in table.rows:
        label = row.label
        if row.source != "ours":
            label += f" *({row.source})*"
        if row.source == "published":
            label += f" [{citations.index(row.citation) + 1}]"
        lines.append("| " + " | ".join(_md_escape(c) for c in [label, *row.cells]) + " |")
    lines.append("")
    sources = sorted({row.source for row in table.rows} - {"ours"}, key=SOURCES.index)
    notes = [f"Rows marked *({source})*: {SOURCE_NOTES[source]}." for source in sources]
    notes += table.notes
    if notes:
        lines += [f"- {note}" for note in notes] + [""]
    if citations:
        lines += [f"[{i}] {citation}" for i, citation in enumerate(citations, 1)] + [""]
    return "\n".join(lines)


# --- HTML ---------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2933;
       margin: 1.5rem; font-size: 14px; }
h1 { font-size: 1.35rem; margin: 0 0 .25rem 0; }
h2 { font-size: 1.1rem; margin: 1.75rem 0 .5rem 0; }
p.lead { color: #52606d; margin: 0 0 1rem 0; max-width: 60rem; }
table { border-collapse: collapse; margin: .25rem 0 .5rem 0; }
th, td { padding: .3rem .6rem; border-bottom: 1px solid #e4e7eb; white-space: nowrap; }
thead th { background: #f5f7fa; border-bottom: 2px solid #9aa5b1; vertical-align: bottom;
           text-align: right; font-weight: 600; white-space: normal; min-width: 4rem; }
thead th.group { text-align: center; border-bottom: 1px solid #9aa5b1; }
th.label, td.label { text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { text-align: left; white-space: normal; max-width: 40rem; }
th .unit { display: block; font-weight: 400; color: #616e7c; font-size: .85em; }
tr.reference td { background: #f0f4f8; }
tr.published td { background: #fffbea; }
.badge { display: inline-block; font-size: .75em; padding: 0 .4em; margin-left: .4em;
         border-radius: .6em; border: 1px solid #9aa5b1; color: #52606d; }
tr.published .badge { border-color: #cb6e17; color: #8d2b0b; }
ul.notes, ol.citations { color: #52606d; max-width: 60rem; padding-left: 1.2rem; }
a.download { font-size: .9em; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def html_table(table: Table) -> str:
    """One table as an HTML fragment: heading, table, notes, citations."""
    citations = table.citations()
    groups = [c.group for c in table.columns]
    has_groups = any(groups)
    parts = [f"<h2>{_e(table.title)}</h2>", "<table>", "<thead>"]
    if has_groups:
        parts.append("<tr>")
        parts.append(f'<th class="label" rowspan="2">{_e(table.first_header)}</th>')
        index = 0
        while index < len(groups):
            span = 1
            while index + span < len(groups) and groups[index + span] == groups[index]:
                span += 1
            name = groups[index]
            if name:
                parts.append(f'<th class="group" colspan="{span}">{_e(name)}</th>')
            else:
                parts.append(f'<th colspan="{span}"></th>')
            index += span
        parts.append("</tr>")
    parts.append("<tr>")
    if not has_groups:
        parts.append(f'<th class="label">{_e(table.first_header)}</th>')
    for column in table.columns:
        unit = f'<span class="unit">{_e(column.unit)}</span>' if column.unit else ""
        parts.append(f"<th>{_e(column.header)}{unit}</th>")
    parts += ["</tr>", "</thead>", "<tbody>"]
    for row in table.rows:
        label = _e(row.label)
        if row.source != "ours":
            label += f'<span class="badge" title="{_e(SOURCE_NOTES[row.source])}">'
            label += f"{_e(row.source)}</span>"
        if row.source == "published":
            number = citations.index(row.citation) + 1
            label += f'<sup><a href="#cite-{number}">[{number}]</a></sup>'
        cells = "".join(
            f'<td class="{"text" if column.style == "text" else "num"}">{_e(cell)}</td>'
            for column, cell in zip(table.columns, row.cells, strict=True)
        )
        parts.append(f'<tr class="{row.source}"><td class="label">{label}</td>{cells}</tr>')
    parts += ["</tbody>", "</table>"]
    sources = sorted({row.source for row in table.rows} - {"ours"}, key=SOURCES.index)
    notes = [f"<em>{_e(s)}</em> rows: {_e(SOURCE_NOTES[s])}." for s in sources]
    notes += [_e(note) for note in table.notes]
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{n}</li>" for n in notes) + "</ul>")
    if citations:
        items = "".join(
            f'<li id="cite-{i}">{_e(citation)}</li>' for i, citation in enumerate(citations, 1)
        )
        parts.append(f'<ol class="citations">{items}</ol>')
    return "\n".join(parts)


def html_page(
    title: str,
    tables: Sequence[Table],
    lead: str = "",
    downloads: Mapping[str, bytes] | None = None,
) -> str:
    """A self-contained HTML page (inline CSS, no scripts, no external files) holding the
    tables; ``downloads`` (file name -> bytes) become links to embedded copies, so the
    machine-readable twin travels inside the report too."""
    body = [f"<h1>{_e(title)}</h1>"]
    if lead:
        body.append(f'<p class="lead">{_e(lead)}</p>')
    body += [html_table(table) for table in tables]
    for name, data in (downloads or {}).items():
        encoded = base64.b64encode(data).decode("ascii")
        mime = "text/csv" if name.endswith(".csv") else "application/octet-stream"
        body.append(
            f'<p><a class="download" download="{_e(name)}" '
            f'href="data:{mime};base64,{encoded}">Download {_e(name)}</a> '
            "(every number unrounded, one row per model)</p>"
        )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
