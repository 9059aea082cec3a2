"""Views of passkey records (``scca-eval passkey``): accuracy tables and heat maps.

A summary table has one row per pattern (or model · pattern) and one column per ctx; a
detail table per row shows the accuracy by depth bucket × ctx. The heat maps draw the
detail tables, one panel per pattern. Like the perplexity views they read records only.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from .grid import PRESET_ORDER, pattern_identity, pattern_labels, pattern_name, variant_labels, variant_values

MISSING = "–"


@dataclass
class PasskeyRow:
    """One pattern (of one model): its records by ctx."""

    label: str
    model: str
    pattern: str
    variant: str = ""  # adapter, RoPE scaling, training pattern, where records of one model differ in them
    records: dict[int, dict] = field(default_factory=dict)

    def depth_buckets(self) -> list[tuple[float, float]]:
        return sorted({(d["depth_from"], d["depth_to"]) for r in self.records.values()
                       for d in r["metrics"]["by_depth"]})

    def depth_cell(self, ctx: int, bucket: tuple[float, float]) -> dict | None:
        record = self.records.get(ctx)
        if record is None:
            return None
        return next((d for d in record["metrics"]["by_depth"]
                     if (d["depth_from"], d["depth_to"]) == bucket), None)


def passkey_rows(records: Sequence[dict]) -> list[PasskeyRow]:
    """Rows in the paper's pattern order; model in the label when there are several models, and
    the adapter, RoPE scaling or training pattern when records of one model differ in them."""
    if not records:
        raise UserError("nothing to show: give passkey result files or folders")
    labels = pattern_labels(records)
    variants = variant_labels(records)
    several_models = len({r["model"] for r in records}) > 1
    rows: dict[tuple, PasskeyRow] = {}

    def order(record: dict) -> tuple:
        name = pattern_name(record)
        return (PRESET_ORDER.index(name) if name in PRESET_ORDER else len(PRESET_ORDER),)

    models = list(dict.fromkeys(r["model"] for r in records))
    for record in sorted(records, key=lambda r: (models.index(r["model"]), *order(r), variants[id(r)])):
        key = (record["model"], pattern_identity(record), variant_values(record))
        label = labels[pattern_identity(record)]
        shown = " · ".join(part for part in (record["model"] if several_models else "", label, variants[id(record)])
                           if part)
        row = rows.setdefault(key, PasskeyRow(shown, record["model"], label, variants[id(record)]))
        if record["ctx"] in row.records:
            raise UserError(f"passkey: two records for '{row.label}' at ctx {record['ctx']} "
                            f"({row.records[record['ctx']].get('path', '?')} and {record.get('path', '?')}); "
                            "give only one of them (e.g. keep each run in its own folder)")
        row.records[record["ctx"]] = record
    return list(rows.values())


def _percent(correct: int, trials: int) -> str:
    return f"{100 * correct / trials:.0f}" if trials else MISSING


def _depth_label(bucket: tuple[float, float]) -> str:
    return f"{100 * bucket[0]:.0f}–{100 * bucket[1]:.0f}%"


def _markdown_table(header: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return out


def _trials_text(records: Sequence[dict]) -> str:
    counts = sorted({d["trials"] for r in records for d in r["metrics"]["by_depth"]})
    return "/".join(str(c) for c in counts) + (" trial" if counts == [1] else " trials")


def passkey_tables(records: Sequence[dict], *, format: str = "markdown") -> str:
    """The summary table and one depth × ctx table per row, as markdown or CSV."""
    if format == "csv":
        return _csv(passkey_rows(records))
    if format != "markdown":
        raise UserError(f"passkey records are shown as markdown or csv, not {format}; use --format markdown or csv")
    rows = passkey_rows(records)
    ctxs = sorted({ctx for row in rows for ctx in row.records})
    models = list(dict.fromkeys(row.model for row in rows))
    context = f" · model: {models[0]}" if len(models) == 1 else ""
    parts = [f"**passkey** — retrieval accuracy (%), higher is better{context} · "
             f"{_trials_text(records)} per depth bucket", ""]
    parts += _markdown_table(["pattern" if len(models) == 1 else "model · pattern", *map(str, ctxs)], [
        [row.label] + [_percent(row.records[c]["metrics"]["correct"], row.records[c]["metrics"]["trials"])
                       if c in row.records else MISSING for c in ctxs]
        for row in rows])
    for row in rows:
        parts += ["", f"**passkey · {row.label}** — accuracy (%) by depth of the key line "
                      "(share of the filler before it) × ctx", ""]
        lines = []
        for bucket in row.depth_buckets():
            cells = [row.depth_cell(c, bucket) for c in ctxs]
            lines.append([_depth_label(bucket)] + [_percent(d["correct"], d["trials"]) if d else MISSING
                                                   for d in cells])
        parts += _markdown_table(["depth", *map(str, ctxs)], lines)
    return "\n".join(parts)


def _csv(rows: list[PasskeyRow]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "pattern", "ctx", "depth_from", "depth_to", "correct", "trials", "accuracy"])
    for row in rows:
        pattern = " · ".join(part for part in (row.pattern, row.variant) if part)
        for ctx, record in sorted(row.records.items()):
            metrics = record["metrics"]
            writer.writerow([row.model, pattern, ctx, 0.0, 1.0, metrics["correct"], metrics["trials"],
                             metrics["accuracy"]])
            for depth in metrics["by_depth"]:
                writer.writerow([row.model, pattern, ctx, depth["depth_from"], depth["depth_to"],
                                 depth["correct"], depth["trials"], depth["accuracy"]])
    return buffer.getvalue().rstrip("\n")


def plot_heatmaps(records: Sequence[dict], out_prefix: str | Path, *, title: str | None = None) -> list[Path]:
    """One heat map per row (pattern, or model · pattern): accuracy by depth bucket × ctx.
    Writes PREFIX.png and PREFIX.svg; returns the paths."""
    from ..files import atomic_write, check_output_path
    from .plot import output_paths

    paths = output_paths(out_prefix)
    for path in paths:
        check_output_path(path)
    figure = heatmap_figure(records, title=title)
    for path in paths:
        atomic_write(path, lambda handle, ext=path.suffix[1:]: figure.savefig(handle, format=ext, dpi=150))
    return paths


def heatmap_figure(records: Sequence[dict], *, title: str | None = None):
    """The heat maps of ``records`` as one figure (accuracy in %, as the cells say it)."""
    from .plot import _figure_class, wrap_to_width

    rows = passkey_rows(records)
    Figure, FigureCanvasAgg = _figure_class()
    ctxs = sorted({ctx for row in rows for ctx in row.records})
    columns = min(3, len(rows))
    lines = math.ceil(len(rows) / columns)
    width = max(1.1 * len(ctxs) * columns + 2.5, 5.0)
    figure = Figure(figsize=(width, 2.9 * lines + 0.9), layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(lines, columns, squeeze=False)
    image = None
    for index, row in enumerate(rows):
        axes = panels[index // columns][index % columns]
        buckets = row.depth_buckets()
        values = [[math.nan] * len(ctxs) for _ in buckets]
        for y, bucket in enumerate(buckets):
            for x, ctx in enumerate(ctxs):
                cell = row.depth_cell(ctx, bucket)
                if cell is not None and cell["trials"]:
                    values[y][x] = 100 * cell["correct"] / cell["trials"]
                    axes.text(x, y, f"{values[y][x]:.0f}", ha="center", va="center", fontsize="small",
                              color="black" if values[y][x] > 50 else "white")
        image = axes.imshow(values, vmin=0, vmax=100, cmap="viridis", aspect="auto", origin="upper")
        axes.set_xticks(range(len(ctxs)), [str(c) for c in ctxs])
        axes.set_yticks(range(len(buckets)), [_depth_label(b) for b in buckets])
        axes.set_xlabel("ctx (tokens)")
        axes.set_ylabel("depth of the key")
        axes.set_title(wrap_to_width(row.label, (width - 1.5) / columns - 0.6, 9), fontsize=9)
    for index in range(len(rows), lines * columns):
        panels[index // columns][index % columns].set_visible(False)
    figure.colorbar(image, ax=panels, label="passkey accuracy (%)", shrink=0.8)
    heading = title or f"passkey retrieval accuracy ({_trials_text(records)} per depth bucket and ctx)"
    figure.suptitle(wrap_to_width(heading, width - 0.4, 11), fontsize=11)
    return figure
