"""The paper-style table: one per task, rows × ctx columns, best measured value per column in bold.

Formats: markdown (for READMEs and pull requests), CSV (one file for every task, full
precision, for further processing; no bold; written by pandas) and LaTeX (booktabs, one
``table`` per task). Published reference rows come after the measured ones, under their
own heading, with a line that names their source. Under each markdown and LaTeX table a
line says how many tokens and documents lie behind each cell.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from ..errors import UserError
from .grid import METRICS, Cell, Row, TaskGrid, build_grids, measurement_groups

FORMATS = ("markdown", "csv", "latex")
MISSING = "–"


def markdown_tables(records: Sequence[dict], digits: int = 2) -> str:
    """One markdown table per task in the paper's layout (rows: patterns, or model · pattern
    for several models; columns: ctx; best value per column in bold): the end-of-run table of
    `scca-eval ppl` and `sweep`, the same as `scca-eval table` prints."""
    return render_tables(records, digits=digits)


def render_tables(records: Sequence[dict], *, format: str = "markdown", metric: str = "perplexity",
                  rows: str = "auto", ci: bool = False, references: Sequence = (), digits: int = 2) -> str:
    """Tables of ``records`` (and ``references``, see :mod:`.reference`) as text.

    rows:   ``auto`` (patterns for one model, model · pattern otherwise), ``pattern``,
            ``model`` or ``model-pattern``
    ci:     add ``± half-width`` of the 95% bootstrap interval (perplexity only)
    """
    if format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)} (got {format!r})")
    if ci and metric != "perplexity":
        raise UserError("--ci shows the bootstrap interval of token perplexity; use it with --metric perplexity")
    if digits < 0:
        raise UserError(f"--digits must be 0 or more (got {digits})")
    if not records and not references:
        raise UserError("nothing to tabulate: give result files or folders (or --reference)")
    groups = measurement_groups(records) if records else [("", [])]
    parts, frames = [], []
    for label, members in groups:
        # published rows go with the first group only: they are shown once
        grids = build_grids(members, metric=metric, rows=rows, references=references if not parts else ())
        if format == "csv":
            frames.append(_csv_frame(grids, ci, label if len(groups) > 1 else None))
            parts.append(label)
            continue
        render = _markdown if format == "markdown" else _latex
        heading = [] if not label else [f"### {label}" if format == "markdown" else f"% {label}"]
        parts.append("\n\n".join(heading + [render(grid, ci, digits) for grid in grids]))
    if format == "csv":
        return pd.concat(frames).to_csv(index=False, lineterminator="\n").rstrip("\n")
    return "\n\n".join(parts)


def _number(cell: Cell | None, ci: bool, digits: int, pm: str) -> str | None:
    if cell is None:
        return None
    text = f"{cell.value:.{digits}f}"
    if ci and cell.half_width is not None:
        text += f"{pm}{cell.half_width:.{digits}f}"
    return text


def _caption(grid: TaskGrid) -> str:
    what = f"{METRICS[grid.metric]}, lower is better"
    if len(grid.rows) > 1:
        what += "; best measured value per column in bold"
    context = []
    if grid.row_header == "pattern" and len(grid.models) == 1:
        context.append(f"model: {grid.models[0]}")
    if grid.row_header == "model" and len(grid.patterns) == 1:
        context.append(f"pattern: {grid.patterns[0]}")
    if not grid.rows:
        context.append("no measured rows")
    return what + "".join(f" · {c}" for c in context)


# ---------------------------------------------------------------- markdown

def _markdown_row(grid: TaskGrid, row: Row, ci: bool, digits: int) -> str:
    cells = []
    for ctx in grid.ctxs:
        text = _number(row.cells.get(ctx), ci, digits, " ± ") or MISSING
        cells.append(f"**{text}**" if grid.is_best(row, ctx, digits) else text)
    return f"| {row.label} | " + " | ".join(cells) + " |"


def _markdown(grid: TaskGrid, ci: bool, digits: int) -> str:
    lines = [f"**{grid.task}** — {_caption(grid)}", ""]
    lines.append(f"| {grid.row_header} | " + " | ".join(str(c) for c in grid.ctxs) + " |")
    lines.append("| --- | " + " | ".join("---:" for _ in grid.ctxs) + " |")
    lines += [_markdown_row(grid, row, ci, digits) for row in grid.rows]
    if grid.published:
        lines.append("| *published figures, not measured here* | " + " | ".join("" for _ in grid.ctxs) + " |")
        lines += [_markdown_row(grid, row, False, digits) for row in grid.published]
    notes = ([f"*{grid.scored_note()}*"] if grid.scored_note() else []) + list(grid.sources)
    for note in notes:  # each its own paragraph
        lines += ["", note]
    return "\n".join(lines)


# ---------------------------------------------------------------- LaTeX

_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text)).replace("·", r"$\cdot$").replace(
        "×", r"$\times$")


def _latex_row(grid: TaskGrid, row: Row, ci: bool, digits: int) -> str:
    cells = []
    for ctx in grid.ctxs:
        text = _number(row.cells.get(ctx), ci, digits, r" $\pm$ ") or "--"
        cells.append(rf"\textbf{{{text}}}" if grid.is_best(row, ctx, digits) else text)
    return f"{latex_escape(row.label)} & " + " & ".join(cells) + r" \\"


def _latex(grid: TaskGrid, ci: bool, digits: int) -> str:
    columns = len(grid.ctxs) + 1
    lines = [
        "% needs \\usepackage{booktabs}",
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{latex_escape(grid.task)}: {latex_escape(_caption(grid))}.}}",
        rf"\begin{{tabular}}{{l{'r' * len(grid.ctxs)}}}",
        r"\toprule",
        f"{latex_escape(grid.row_header)} & " + " & ".join(str(c) for c in grid.ctxs) + r" \\",
        r"\midrule",
    ]
    lines += [_latex_row(grid, row, ci, digits) for row in grid.rows]
    if grid.published:
        if grid.rows:
            lines.append(r"\midrule")
        lines.append(rf"\multicolumn{{{columns}}}{{l}}{{\textit{{Published figures, not measured here}}}} \\")
        lines += [_latex_row(grid, row, False, digits) for row in grid.published]
    lines.append(r"\bottomrule")
    lines.append(r"\end{tabular}")
    for source in ([grid.scored_note()] if grid.scored_note() else []) + grid.sources:
        lines.append(rf"\par\footnotesize {latex_escape(source)}")
    lines.append(r"\end{table}")
    return "\n".join(lines)


# ---------------------------------------------------------------- CSV

def _csv_frame(grids: list[TaskGrid], ci: bool, measured: str | None) -> pd.DataFrame:
    """The rows of ``grids``; with ``measured`` (records of several budgets or protocols in one
    file) a column saying which each row is."""
    ctxs = sorted({ctx for grid in grids for ctx in grid.ctxs})
    lines = []
    for grid in grids:
        for row in grid.rows + grid.published:
            line = {"task": grid.task, "metric": grid.metric, "kind": "published" if row.published else "measured",
                    "model": row.model or "", "pattern": row.pattern or "", "row": row.label}
            if measured is not None:
                line["measured"] = "" if row.published else measured
            for ctx in ctxs:
                cell = row.cells.get(ctx)
                line[str(ctx)] = cell.value if cell else None
                if ci:
                    interval = cell.ci95 if cell is not None and cell.ci95 else (None, None)
                    line[f"{ctx}_ci95_low"], line[f"{ctx}_ci95_high"] = interval
            line["source"] = " ".join(grid.sources) if row.published else ""
            lines.append(line)
    columns = ["task", "metric", "kind", "model", "pattern", "row"] + (["measured"] if measured is not None else [])
    for ctx in ctxs:
        columns += [str(ctx)] + ([f"{ctx}_ci95_low", f"{ctx}_ci95_high"] if ci else [])
    return pd.DataFrame(lines, columns=columns + ["source"])
