"""Perplexity against ctx: one panel per task, one line per row (pattern or model).

The x axis is log2 (ctx doubles from one column to the next), error bars are the 95%
bootstrap intervals of the records, and published reference rows are dashed. Files are
written with matplotlib's Agg (PNG) and SVG canvases, without pyplot, so no display and
no global backend setting are involved; each file is written atomically, like a record.
matplotlib is part of the default install.
"""

from __future__ import annotations

import math
import textwrap
from collections import Counter
from pathlib import Path
from typing import Sequence

from ..errors import MissingDependency, UserError
from ..files import atomic_write, check_output_path
from .grid import METRICS, Row, build_grids, measurement_groups, measurement_tag

FORMATS = ("png", "svg")
PANEL_WIDTH = 5.6  # inches per panel


def _figure_class():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependency("matplotlib", None, "scca-eval plot") from None
    return Figure, FigureCanvasAgg


def output_paths(prefix: str | Path) -> list[Path]:
    """PREFIX.png and PREFIX.svg (a .png or .svg suffix given with the prefix is dropped)."""
    prefix = Path(prefix)
    if prefix.suffix.lower() in (".png", ".svg"):
        prefix = prefix.with_suffix("")
    if not prefix.name:
        raise UserError("--out needs a file name prefix, e.g. results/plots/ppl")
    return [prefix.with_name(f"{prefix.name}.{ext}") for ext in FORMATS]


def _draw_row(axes, row: Row, style: dict) -> None:
    ctxs = sorted(row.cells)
    if not ctxs:
        return
    values = [row.cells[c].value for c in ctxs]
    yerr = None
    if any(row.cells[c].ci95 for c in ctxs):
        # Asymmetric bars: the bootstrap interval need not be centred on the estimate.
        yerr = [[row.cells[c].value - row.cells[c].ci95[0] if row.cells[c].ci95 else 0 for c in ctxs],
                [row.cells[c].ci95[1] - row.cells[c].value if row.cells[c].ci95 else 0 for c in ctxs]]
    axes.errorbar(ctxs, values, yerr=yerr, label=row.label, capsize=3, **style)


def plot_records(records: Sequence[dict], out_prefix: str | Path, *, metric: str = "perplexity",
                 rows: str = "auto", references: Sequence = (), title: str | None = None) -> list[Path]:
    """Draw ``records`` (and published ``references``) and write PREFIX.png and PREFIX.svg.

    Returns the paths written.
    """
    if not records and not references:
        raise UserError("nothing to plot: give result files or folders (or --reference)")
    groups = measurement_groups(records) if records else [("", [])]
    prefix = output_paths(out_prefix)[0].with_suffix("")
    planned = []
    for label, members in groups:  # records of another budget or protocol: a picture of their own
        paths = output_paths(prefix.with_name(f"{prefix.name}-{measurement_tag(label)}") if label else prefix)
        for path in paths:  # before drawing: a folder in the way should not cost a rendering
            check_output_path(path)
        planned.append((label, members, paths))
    written = []
    for index, (label, members, paths) in enumerate(planned):
        grids = build_grids(members, metric=metric, rows=rows, references=references if index == 0 else ())
        heading = " · ".join(part for part in (title, label) if part) or None
        written += _draw(grids, paths, metric, heading)
    return written


def _draw(grids, paths: list[Path], metric: str, title: str | None) -> list[Path]:
    figure = grids_figure(grids, metric, title)
    # Each file is rendered into a temporary file beside it and then renamed, so a reader
    # (or an interrupted run) never leaves half a picture under the final name.
    for path in paths:
        atomic_write(path, lambda handle, ext=path.suffix[1:]: figure.savefig(handle, format=ext, dpi=150))
    return paths


def wrap_to_width(text: str, inches: float, points: float = 10.0) -> str:
    """``text`` cut into lines that fit ``inches`` at a font of ``points`` (a character of
    DejaVu Sans is about 0.6 of the font size wide on average)."""
    characters = max(12, int(inches * 72 / (0.6 * points)))
    return "\n".join(textwrap.fill(line, characters) for line in text.split("\n"))


def text_outside(figure) -> list[str]:
    """The texts of a drawn ``figure`` that reach beyond its edges, and the panel titles that
    run into another panel's title (for tests: a picture whose titles are cut off)."""
    canvas = figure.canvas
    canvas.draw()
    renderer = canvas.get_renderer()
    bounds = figure.bbox
    outside = []
    for text in figure.findobj(lambda artist: hasattr(artist, "get_text") and hasattr(artist, "get_window_extent")):
        if not text.get_visible() or not text.get_text():
            continue
        box = text.get_window_extent(renderer)
        if box.x0 < bounds.x0 - 1 or box.x1 > bounds.x1 + 1 or box.y0 < bounds.y0 - 1 or box.y1 > bounds.y1 + 1:
            outside.append(text.get_text())
    titles = [axes.title for axes in figure.axes if axes.get_visible() and axes.get_title()]
    boxes = [title.get_window_extent(renderer) for title in titles]
    for index, box in enumerate(boxes):
        if any(box.overlaps(other) for other in boxes[index + 1:]):
            outside.append(titles[index].get_text())
    return outside


def grids_figure(grids, metric: str, title: str | None):
    """The figure of ``grids``: one panel per task."""
    Figure, FigureCanvasAgg = _figure_class()

    # One colour per pattern (or row) across all panels; a published row takes the colour
    # of the measured pattern it corresponds to, dashed. Rows of one pattern that differ in
    # adapter, RoPE scaling or training pattern get a colour each.
    colours: dict[str, str] = {}

    def colour(key: str) -> str:
        return colours.setdefault(key, f"C{len(colours) % 10}")

    columns = min(3, len(grids))
    lines = math.ceil(len(grids) / columns)
    figure = Figure(figsize=(PANEL_WIDTH * columns, 4.8 * lines), layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(lines, columns, squeeze=False)
    for index, grid in enumerate(grids):
        axes = panels[index // columns][index % columns]
        per_pattern = Counter(row.pattern for row in grid.rows)
        for row in grid.rows:
            key = row.pattern if grid.row_header == "pattern" and per_pattern[row.pattern] == 1 else row.label
            _draw_row(axes, row, {"marker": "o", "linestyle": "-", "color": colour(key)})
        for row in grid.published:
            _draw_row(axes, row, {"marker": "s", "linestyle": "--", "alpha": 0.7, "color": colour(row.pattern)})
        axes.set_xscale("log", base=2)
        axes.set_xticks(grid.ctxs, [str(c) for c in grid.ctxs])
        axes.minorticks_off()
        axes.set_xlabel("ctx (tokens)")
        axes.set_ylabel(METRICS[metric])
        heading = grid.task
        if grid.row_header == "pattern" and len(grid.models) == 1:
            heading += f" · {grid.models[0]}"
        if grid.scored_note():  # the tokens and documents behind the points
            heading += f"\n{grid.scored_note()}"
        axes.set_title(wrap_to_width(heading, PANEL_WIDTH - 0.8, 9), fontsize=9)
        axes.grid(True, alpha=0.3)
        # Below the panel, so that it never hides a line.
        labels = [row.label for row in [*grid.rows, *grid.published]]
        long_labels = max(map(len, labels), default=0) > 28  # two columns of them overlap
        axes.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1 if long_labels else 2,
                    frameon=False)
    for index in range(len(grids), lines * columns):
        panels[index // columns][index % columns].set_visible(False)
    if title:
        figure.suptitle(wrap_to_width(title, PANEL_WIDTH * columns - 0.4, 12))
    return figure
