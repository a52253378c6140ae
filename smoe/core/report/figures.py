"""The figure style every family's figures share: saving (PNG and SVG, atomically, with
reproducible bytes) and the size rule that keeps a figure whole in the ``snakemake --report``
viewer.

``out`` names a figure without or with a ``.png``/``.svg`` suffix; both ``<name>.png`` and
``<name>.svg`` are written (any other suffix is part of the name, so ``routing.seed0`` gives
``routing.seed0.png``); each file is written under ``<file>.partial`` and renamed into place,
parent folders are created, so a killed job never leaves a file that looks finished.

The viewer cannot scroll to the top of an image taller than the window: a PNG is at most 900
px high and at most 0.6 times as high as wide (:func:`fits_report_viewer` checks a written
file against the viewer's limits, :func:`viewer_size` keeps a size inside them). Figures are
plain :class:`matplotlib.figure.Figure` objects on an Agg canvas, never pyplot figures: no
global backend switch, no figure manager to leak, nothing to close.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.layout_engine import PlaceHolderLayoutEngine

from smoe.core.atomic import atomic_file
from smoe.core.errors import InputError

FORMATS = ("png", "svg")
DPI = 150

# The report viewer (``snakemake --report``) centres each PNG in a full-height box beside a
# navbar of 300-400 px, at most as wide as its pane (``max-width: 100%``); what is taller
# than the window loses its top, which cannot be scrolled to. A PNG whose height is at most
# VIEWER_MAX_RATIO of its width and at most VIEWER_MAX_HEIGHT pixels stays whole at
# 1920x1080 (at most 1000 px, and at most 0.62 x the ~1550 px pane) and at 1366x768 (a
# wider image is shrunk to the ~1000 px pane: at most 620 px, under 768 - 24 px padding).
# A PNG at most VIEWER_SMALL_HEIGHT pixels high fits whatever its width (under 768 - 24 px).
VIEWER_MAX_RATIO = 0.62
VIEWER_MAX_HEIGHT = 1000  # pixels
VIEWER_SMALL_HEIGHT = 720  # pixels
# The figures are drawn inside tighter limits, so that a browser's toolbars still leave room:
# at most 900 px high, height at most 0.6 of the width, and at most 1650 px wide (wider
# images fit too, but are shrunk until their text is hard to read at 1366x768).
MAX_HEIGHT = 6.0  # inches, 900 px at DPI
MAX_WIDTH = 11.0  # inches, 1650 px at DPI
MAX_RATIO = 0.6
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- saving -------------------------------------------------------------------------------


def figure_paths(out: str | Path) -> tuple[Path, Path]:
    """The PNG and SVG paths of a figure: a trailing .png/.svg is dropped, others are kept."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix.lower() in (".png", ".svg") else out
    png, svg = (stem.with_name(f"{stem.name}.{fmt}") for fmt in FORMATS)
    return png, svg


def new_figure(width: float, height: float, layout: str = "constrained") -> Figure:
    """A constrained-layout figure on its own Agg canvas (independent of pyplot's state).

    Grids of images take ``layout="compressed"``: constrained layout places the titles of
    fixed-aspect axes for the box before the aspect shrinks it, and can push them out of
    the figure; compressed layout packs the shrunk boxes and keeps their labels inside.
    """
    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def viewer_size(width: float, height: float) -> tuple[float, float]:
    """A figure size (inches) inside the report viewer's limits (see MAX_HEIGHT).

    A size beyond MAX_WIDTH or MAX_HEIGHT is scaled down as a whole; a size taller than
    MAX_RATIO of its width is made wider (the layout centres the content), never taller.
    The figure functions choose their layouts to fit already; this is the safety net.
    """
    scale = min(1.0, MAX_WIDTH / width, MAX_HEIGHT / height)
    width, height = width * scale, height * scale
    return max(width, height / MAX_RATIO), height


def viewer_figure(width: float, height: float) -> Figure:
    """:func:`new_figure` of :func:`viewer_size`: a figure the report viewer shows whole."""
    return new_figure(*viewer_size(width, height))


def png_size(path: str | Path) -> tuple[int, int]:
    """Width and height in pixels of a PNG file, from its header."""
    with open(path, "rb") as handle:
        head = handle.read(24)
    if len(head) < 24 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise InputError(f"{str(path)!r} is not a PNG file")
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


def fits_report_viewer(png_path: str | Path) -> bool:
    """Whether the report viewer shows this PNG whole at 1920x1080 and at 1366x768 windows
    (:func:`fits_viewer` of its size)."""
    return fits_viewer(*png_size(png_path))


def fits_viewer(width: int, height: int) -> bool:
    """Whether an image of ``width`` x ``height`` pixels stays whole in the report viewer
    (see VIEWER_MAX_RATIO): small enough as it is, or shrunk with the pane's width."""
    if height <= VIEWER_SMALL_HEIGHT:
        return True
    return height <= VIEWER_MAX_RATIO * width and height <= VIEWER_MAX_HEIGHT


def fix_layout(fig: Figure) -> None:
    """Lay the figure out once and keep the positions: the PNG and the SVG get the same
    layout, and the constrained layout (slow for grids of images) is solved once, not once
    per file. Afterwards, ``fig.get_tightbbox()`` says whether anything reaches outside.
    A figure without a layout engine, or one already fixed, is left as it is."""
    engine = fig.get_layout_engine()
    if engine is None or isinstance(engine, PlaceHolderLayoutEngine):
        return
    fig.draw_without_rendering()
    fig.set_layout_engine("none")


def save_figure(fig: Figure, out: str | Path) -> tuple[Path, Path]:
    """Write ``fig`` as PNG and SVG (see the module docstring for the naming rule).

    SVG ids are salted with a constant and no date is stored, so reruns give identical
    files and Snakemake does not see spurious changes; SVG text stays text (editable, small).
    The layout is solved once for both files (:func:`fix_layout`); the figure is cleared
    afterwards to free its artists at once.
    """
    paths = figure_paths(out)
    fix_layout(fig)
    with matplotlib.rc_context({"svg.hashsalt": "smoe", "svg.fonttype": "none"}):
        for path, fmt in zip(paths, FORMATS, strict=True):
            metadata = {"Date": None} if fmt == "svg" else {}
            with atomic_file(path) as partial:
                fig.savefig(partial, format=fmt, dpi=DPI, metadata=metadata)
    fig.clear()
    return paths


# --- layout and colours ---------------------------------------------------------------


def model_colours(models: Sequence[str]) -> dict[str, Any]:
    """One colour per model, by position, so a figure's models stay distinguishable: tab10,
    or tab20 for more than ten models (the paper config has eleven)."""
    cmap = matplotlib.colormaps["tab10" if len(models) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(models)}


@dataclass(frozen=True)
class Grid:
    """Panels in ``rows`` x ``cols``, each ``side`` inches wide, in a figure ``size``."""

    rows: int
    cols: int
    side: float
    size: tuple[float, float]


def grid_layout(
    panels: int,
    aspect: float = 1.0,
    extra: tuple[float, float] = (0.1, 0.4),
    fixed: tuple[float, float] = (0.2, 0.5),
    largest: float = 3.0,
) -> Grid:
    """The grid that draws ``panels`` images largest within the viewer limits.

    Each panel is ``side`` wide and ``side * aspect`` high plus ``extra`` (width, height:
    titles, gaps); the figure adds ``fixed`` (width, height: legends, suptitle). Among all
    column counts the one with the largest side wins, ties going to fewer rows.
    """
    best: Grid | None = None
    for cols in range(1, panels + 1):
        rows = math.ceil(panels / cols)
        side = min(
            largest,
            (MAX_WIDTH - fixed[0]) / cols - extra[0],
            ((MAX_HEIGHT - fixed[1]) / rows - extra[1]) / aspect,
        )
        if best is None or side > best.side + 1e-9:
            size = (
                cols * (side + extra[0]) + fixed[0],
                rows * (side * aspect + extra[1]) + fixed[1],
            )
            best = Grid(rows, cols, side, viewer_size(*size))
    assert best is not None, "no panels"
    return best
