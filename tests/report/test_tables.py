"""Result tables rendered as Markdown and as standalone HTML."""

import base64
import re
from html.parser import HTMLParser

import pytest

from smoe.core.report.tables import (
    Column,
    Table,
    format_number,
    html_page,
    markdown_table,
    mean_spread,
)


class Cells(HTMLParser):
    """The text of every <th>/<td>, row by row, and the tags seen (a strict-enough parse)."""

    def __init__(self):
        super().__init__()
        self.rows, self.tags, self._cell = [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def example():
    table = Table(
        "Scores",
        [Column("accuracy", "%", "percent"), Column("error", "", "sci")],
        notes=["a <note> & more"],
    )
    table.add("ours-model", "ours", [mean_spread(91.234, 1.5, "percent"), "1.00e-03"])
    table.add("baseline", "reference", [mean_spread(50.0, None, "percent"), ""])
    table.add("paper", "published", ["93.00", ""], citation="A. Author. Title. Venue 2022")
    table.add("paper bis", "published", ["92.00", ""], citation="A. Author. Title. Venue 2022")
    return table


def test_numbers_are_rounded_for_reading_and_spread_only_where_it_exists():
    assert format_number(87.7123, "percent") == "87.71"
    assert format_number(1.23456e-6, "sci") == "1.23e-06"
    assert format_number(12315, "count") == "12,315"
    assert format_number(129.6, "seconds") == "130" and format_number(2.04, "seconds") == "2.0"
    assert mean_spread(85.0, 7.0711, "percent") == "85.00 ± 7.07"
    assert mean_spread(85.0, float("nan"), "percent") == "85.00"
    assert mean_spread(float("nan"), 1.0, "percent") == ""


def test_html_page_is_a_real_table_with_marked_and_cited_rows():
    page = html_page("Title", [example()], downloads={"t.csv": b"a,b\n1,2\n"})
    parser = Cells()
    parser.feed(page)
    assert parser.rows[0] == ["model", "accuracy%", "error"]
    assert parser.rows[1] == ["ours-model", "91.23 ± 1.50", "1.00e-03"]
    assert parser.rows[2][0] == "baselinereference" and parser.rows[2][1] == "50.00"
    assert parser.rows[3][0] == "paperpublished[1]" and parser.rows[4][0] == "paper bispublished[1]"
    assert page.count('<li id="cite-1">A. Author. Title. Venue 2022</li>') == 1  # cited once
    assert "a &lt;note&gt; &amp; more" in page  # text is escaped, never markup
    assert "<script" not in page and "http" not in page  # self-contained
    encoded = re.search(r'download="t.csv" href="data:text/csv;base64,([^"]+)"', page)[1]
    assert base64.b64decode(encoded) == b"a,b\n1,2\n"


def test_grouped_columns_get_a_spanning_header():
    table = Table(
        "Per type",
        [Column("x", "%", "percent", group=f"type {t}") for t in (0, 0, 1)],
    )
    table.add("m", "ours", ["1", "2", "3"])
    page = html_page("T", [table])
    assert '<th class="group" colspan="2">type 0</th>' in page
    assert '<th class="group" colspan="1">type 1</th>' in page
    assert '<th class="label" rowspan="2">model</th>' in page


def test_markdown_marks_sources_and_lists_citations():
    text = markdown_table(example())
    assert "| model | accuracy (%) | error |" in text
    assert "| baseline *(reference)* | 50.00 |  |" in text
    assert "| paper *(published)* [1] | 93.00 |  |" in text
    assert "[1] A. Author. Title. Venue 2022" in text
    assert "- Rows marked *(reference)*: analytic predictor" in text


def test_a_published_row_without_citation_or_a_short_row_is_refused():
    table = Table("T", [Column("a")])
    with pytest.raises(ValueError, match="published row 'p' has no citation"):
        table.add("p", "published", ["1"])
    with pytest.raises(ValueError, match="row 'q' has 2 cells for 1 columns"):
        table.add("q", "ours", ["1", "2"])
    with pytest.raises(ValueError, match="source 'mine'"):
        table.add("r", "mine", ["1"])
