"""Records arranged as papers lay them out: for each task, rows (patterns or models) × ctx columns.

Tables and plots draw the same grids, so both agree on what a row is, how it is labelled,
and which value counts as the best of a column. Published reference rows are kept apart
from measured ones (``TaskGrid.published``) and never take part in the "best" mark.

A row is identified by the model (when rows show models), the pattern, the model's
variant (adapter, RoPE scaling, the pattern an adapter was trained under) and — when it
differs from the default — the stride. Two patterns with the same name but different
settings (chunk size, dilation) get labels that show the setting that differs, e.g.
``sda (r=2)`` and ``sda (r=4)``; a custom mix is labelled by its groups; runs of one model
with different variants get labels that show the variant setting that differs.

A column compares rows only when they measured the same thing: records of one task made
with different token budgets (``--max-tokens``) or protocols are refused, as ``compare``
refuses them. The grids are built from :func:`.frame.records_frame`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ..choices import PRESETS
from ..errors import UserError
from ..records import pattern_config, pattern_identity
from .frame import cell_settings, records_frame

# metric key in a record -> how titles and axes name it (lower is better for all of them)
METRICS = {
    "perplexity": "token perplexity",
    "bits_per_byte": "bits per byte",
    "word_perplexity": "word perplexity",
    "byte_perplexity": "byte perplexity",
}
ROW_MODES = ("auto", "pattern", "model", "model-pattern")

# Rows of the presets come in the order the paper discusses them; other patterns follow
# in the order they first appear.
PRESET_ORDER = PRESETS

# How a differing pattern setting shows in a label.
_SETTING_NAMES = {"chunk_size": "G", "chunk_ratio": "G/ctx", "dilation": "r"}


@dataclass
class Cell:
    """One number of a grid, with where it came from."""

    value: float
    ci95: tuple[float, float] | None = None  # 95% bootstrap interval (perplexity only)
    path: str | None = None                  # the record file, for measured values

    @property
    def half_width(self) -> float | None:
        """Half the width of the 95% interval: what ``±`` shows."""
        if self.ci95 is None:
            return None
        return (self.ci95[1] - self.ci95[0]) / 2


@dataclass
class Row:
    label: str
    cells: dict[int, Cell]   # ctx -> value
    model: str | None = None
    pattern: str | None = None
    published: bool = False
    stride: int | None = None  # a fixed stride that differs from ctx, else None
    protocol: str | None = None


@dataclass
class TaskGrid:
    """One table (or plot panel): a task's measured rows and any published rows."""

    task: str
    metric: str
    ctxs: list[int]
    rows: list[Row]
    row_header: str
    published: list[Row] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # one line per reference set shown
    models: list[str] = field(default_factory=list)
    patterns: list[str] = field(default_factory=list)
    # ctx -> (scored tokens, documents) of the column's cells, or None where they differ
    scored: dict[int, tuple[int, int] | None] = field(default_factory=dict)

    def scored_note(self) -> str | None:
        """What lies behind the cells: '147,456 tokens of 6 documents per cell', or per
        column when the columns differ (e.g. a budget that covers fewer documents at 8k)."""
        if not self.scored:
            return None
        texts = {ctx: "varies" if s is None else f"{s[0]:,} tokens of {s[1]} document{'s' * (s[1] != 1)}"
                 for ctx, s in sorted(self.scored.items())}
        if len(set(texts.values())) == 1:
            return f"{next(iter(texts.values()))} per cell"
        return "scored per cell: " + "; ".join(f"ctx {ctx}: {text}" for ctx, text in texts.items())

    def best(self, ctx: int, digits: int | None = None) -> float | None:
        """The lowest measured value of column ``ctx`` (rounded to ``digits`` when given),
        or None when fewer than two rows have a value there (a single value is not a "best")."""
        values = [row.cells[ctx].value for row in self.rows if ctx in row.cells]
        if len(values) < 2:
            return None
        if digits is not None:
            values = [round(v, digits) for v in values]
        return min(values)

    def is_best(self, row: Row, ctx: int, digits: int) -> bool:
        """Whether ``row`` holds the best value of column ``ctx`` as shown with ``digits``
        decimals (ties are all best). Published rows never are."""
        if row.published or ctx not in row.cells:
            return False
        best = self.best(ctx, digits)
        return best is not None and round(row.cells[ctx].value, digits) == best


# ---------------------------------------------------------------- labels

def pattern_name(record: dict) -> str:
    """The preset name, or for a custom mix its groups (``1/2 local + 1/2 cross(1)``)."""
    config = pattern_config(record)
    name = config.get("name") or record["pattern"]
    if name == "custom" and config.get("groups"):
        return str(config["groups"])
    return str(name)


def _setting_text(key: str, config: dict) -> str:
    value = config.get(key)
    if key == "chunk_size" and value is None:
        return f"G=ctx×{config.get('chunk_ratio', '1/4')}"
    if key == "groups":
        return str(value)
    return f"{_SETTING_NAMES.get(key, key)}={value}"


def pattern_labels(records: Iterable[dict]) -> dict[str, str]:
    """pattern identity -> label, unique over ``records``: the name, plus the settings that
    tell apart patterns of the same name."""
    variants: dict[str, dict[str, dict]] = {}
    for record in records:
        variants.setdefault(pattern_name(record), {})[pattern_identity(record)] = pattern_config(record)
    labels = {}
    for name, configs in variants.items():
        if len(configs) == 1:
            labels.update({identity: name for identity in configs})
            continue
        keys = sorted({key for config in configs.values() for key in config} - {"name"})
        differing = [k for k in keys if len({json.dumps(c.get(k)) for c in configs.values()}) > 1]
        if "chunk_ratio" in differing and "chunk_size" not in differing:
            differing = ["chunk_size"] + [k for k in differing if k != "chunk_ratio"]
        for identity, config in configs.items():
            labels[identity] = f"{name} ({', '.join(_setting_text(k, config) for k in differing)})"
    return labels


_VARIANT_KEYS = ("adapter", "rope_scaling", "training_pattern")


def _variant_text(key: str, value) -> str:
    if value is None:
        return {"adapter": "no adapter", "rope_scaling": "no RoPE scaling", "training_pattern": ""}[key]
    if key == "adapter":
        return f"adapter {str(value).rstrip('/').split('/')[-1]}"
    if key == "rope_scaling":
        try:
            scaling = json.loads(value)
        except ValueError:
            return f"RoPE {value}"
        return f"RoPE {scaling.get('requested') or scaling.get('rope_type')}"
    return f"trained under {value}"


def variant_values(record: dict) -> tuple:
    """The record's adapter, RoPE scaling and training pattern (None where unset): what tells
    apart rows of one model and pattern."""
    settings = cell_settings(record)
    return tuple(settings[k] for k in _VARIANT_KEYS)


def variant_labels(records: Sequence[dict]) -> dict[int, str]:
    """For each record (by ``id``), the adapter, RoPE scaling and training pattern that tell it
    apart from other records of its model, in words ("" when none differ)."""
    values = {id(r): dict(zip(_VARIANT_KEYS, variant_values(r))) for r in records}
    by_model: dict[str, list[dict]] = {}
    for record in records:
        by_model.setdefault(record["model"], []).append(values[id(record)])
    differing = [k for k in _VARIANT_KEYS if any(len({v[k] for v in group}) > 1 for group in by_model.values())]
    return {id(r): " · ".join(text for k in differing if (text := _variant_text(k, values[id(r)][k])))
            for r in records}


def model_label(model: str, records: Sequence[dict]) -> str:
    """The model of ``records`` in words, with the adapter, RoPE scaling and training pattern
    they all share ("default · adapter ft-s2 · RoPE linear:2 · trained under s2")."""
    shared = [set(values) for values in zip(*(variant_values(r) for r in records))]
    words = [_variant_text(key, next(iter(values))) for key, values in zip(_VARIANT_KEYS, shared)
             if len(values) == 1 and next(iter(values)) is not None]
    return " · ".join([model, *words])


def _stride_tag(record: dict) -> int | None:
    return None if record["stride"] == record["ctx"] else int(record["stride"])


def _protocol_tag(record: dict) -> str | None:
    """What a row says about its protocol: nothing for the default (stride, full last
    window); records with short last windows (made with --last-window short, or before the
    option existed) are labelled so, so that a table never mixes the two unmarked."""
    from ..records import last_window_of

    protocol = record.get("config", {}).get("protocol", "stride")
    if protocol != "stride":
        return f"{protocol} protocol"
    return "short last window" if last_window_of(record) == "short" else None


def resolve_row_mode(records: Sequence[dict], rows: str) -> str:
    """``auto`` -> ``pattern`` for records of one model, ``model-pattern`` otherwise."""
    if rows not in ROW_MODES:
        raise UserError(f"--rows must be one of {', '.join(ROW_MODES)} (got {rows!r})")
    if rows != "auto":
        return rows
    return "pattern" if len({r["model"] for r in records}) <= 1 else "model-pattern"


ROW_HEADERS = {"pattern": "pattern", "model": "model", "model-pattern": "model · pattern"}


# ---------------------------------------------------------------- grids

def metric_cell(record: dict, metric: str) -> Cell | None:
    metrics = record["metrics"]
    value = metrics.get(metric)
    if value is None:
        return None
    ci95 = metrics.get("ci95") if metric == "perplexity" else None
    return Cell(float(value), tuple(ci95) if ci95 else None, record.get("path"))


def _collision_hint(a: dict, b: dict, mode: str) -> str:
    if a["model"] != b["model"] and mode == "pattern":
        return "they come from different models: use --rows model-pattern"
    if pattern_identity(a) != pattern_identity(b) and mode == "model":
        return "they ran different patterns: use --rows model-pattern"
    return "give only one of them (e.g. keep each run in its own folder)"


def measurement_groups(records: Sequence[dict]) -> list[tuple[str, list[dict]]]:
    """The records split by what they measured: protocol and token budget (``--max-tokens``).
    Records of one group may share a table; records of two groups never do, since their
    columns would set side by side numbers measured on different tokens. Returns
    (label, records) pairs in order of first appearance; the label is "" for a single group,
    else words such as "--max-tokens 2,048" or "protocol lm-eval · whole documents"."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        config = record.get("config", {})
        groups.setdefault((config.get("protocol", "stride"), config.get("max_tokens")), []).append(record)
    if len(groups) == 1:
        return [("", records)]
    protocols = {protocol for protocol, _ in groups}
    labelled = []
    for (protocol, budget), members in groups.items():
        words = [f"protocol {protocol}"] if len(protocols) > 1 else []
        words.append(f"--max-tokens {budget:,}" if budget else "whole documents")
        labelled.append((" · ".join(words), members))
    return labelled


def measurement_tag(label: str) -> str:
    """A file-name form of a measurement_groups label: "max2048", "lm-eval-whole"."""
    tag = label.replace("protocol ", "").replace("--max-tokens ", "max").replace("whole documents", "whole")
    return "-".join(part.replace(",", "") for part in tag.split(" · "))


def build_grids(records: Sequence[dict], *, metric: str = "perplexity", rows: str = "auto",
                references: Sequence = ()) -> list[TaskGrid]:
    """One grid per task (in order of first appearance), then grids for references whose
    task has no measured records. ``references`` are :class:`ReferenceSet` objects."""
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    mode = resolve_row_mode(records, rows)
    frame = records_frame(records)
    if len(frame):
        _refuse_mixed_measurements(frame)
    labels = pattern_labels(records)
    variants = {id(r): variant_values(r) for r in records}
    variant_text = variant_labels(records)  # the variant settings that differ within a model, in words
    model_order = list(dict.fromkeys(r["model"] for r in records))
    pattern_order = list(dict.fromkeys(labels[pattern_identity(r)] for r in records))

    def row_key(record: dict) -> tuple:
        parts = []
        if mode in ("model", "model-pattern"):
            parts.append(record["model"])
        if mode in ("pattern", "model-pattern"):
            parts.append(pattern_identity(record))
        return (*parts, variants[id(record)], _stride_tag(record), _protocol_tag(record))

    def row_label(record: dict) -> str:
        parts = []
        if mode in ("model", "model-pattern"):
            parts.append(record["model"])
        if mode in ("pattern", "model-pattern"):
            parts.append(labels[pattern_identity(record)])
        if variant_text[id(record)]:
            parts.append(variant_text[id(record)])
        if _stride_tag(record) is not None:
            parts.append(f"stride {record['stride']}")
        if _protocol_tag(record) is not None:
            parts.append(_protocol_tag(record))
        return " · ".join(parts)

    def sort_key(record: dict) -> tuple:
        label = labels[pattern_identity(record)]
        name = pattern_name(record)
        preset_rank = PRESET_ORDER.index(name) if name in PRESET_ORDER else len(PRESET_ORDER)
        pattern_rank = (preset_rank, pattern_order.index(label)) if mode != "model" else (0, 0)
        model_rank = model_order.index(record["model"]) if mode != "pattern" else 0
        variant = tuple(str(v) for v in variants[id(record)])
        return (model_rank, *pattern_rank, variant, _stride_tag(record) or 0, _protocol_tag(record) or "")

    grids: list[TaskGrid] = []
    for task in dict.fromkeys(r["task"] for r in records):
        task_records = [r for r in records if r["task"] == task]
        seen: dict[tuple, dict] = {}
        row_records: dict[tuple, list[dict]] = {}
        for record in sorted(task_records, key=sort_key):
            key = row_key(record)
            cell_key = (key, record["ctx"])
            if cell_key in seen:
                other = seen[cell_key]
                raise UserError(
                    f"{task}: two records for row '{row_label(record)}' at ctx {record['ctx']} "
                    f"({other.get('path', '?')} and {record.get('path', '?')}); "
                    f"{_collision_hint(other, record, mode)}")
            seen[cell_key] = record
            row_records.setdefault(key, []).append(record)
        grid_rows = []
        for members in row_records.values():
            first = members[0]
            cells = {}
            for record in members:
                cell = metric_cell(record, metric)
                if cell is not None:
                    cells[record["ctx"]] = cell
            grid_rows.append(Row(
                label=row_label(first), cells=cells,
                model=first["model"] if mode != "pattern" or len(model_order) == 1 else None,
                pattern=labels[pattern_identity(first)] if mode != "model" else None,
                stride=_stride_tag(first), protocol=_protocol_tag(first),
            ))
        grids.append(TaskGrid(
            task=task, metric=metric, ctxs=sorted({r["ctx"] for r in task_records}), rows=grid_rows,
            scored=_scored_per_column(frame[frame["task"] == task]),
            row_header=ROW_HEADERS[mode],
            models=[model_label(model, [r for r in task_records if r["model"] == model])
                    for model in dict.fromkeys(r["model"] for r in task_records)],
            patterns=list(dict.fromkeys(labels[pattern_identity(r)] for r in task_records)),
        ))

    for reference in references:
        _attach_reference(grids, reference, metric, mode)
    return grids


def _refuse_mixed_measurements(frame) -> None:
    """One task's records must share the token budget and the protocol, or a column would
    put side by side numbers measured on different tokens (``compare`` refuses them too)."""
    for column, option in (("max_tokens", "--max-tokens"), ("protocol", "--protocol")):
        shown = frame[column].map(_setting_shown)
        for task, group in frame.groupby("task", sort=False):
            values = shown[group.index]
            if values.nunique() > 1:
                other = values[values != values.iloc[0]].index[0]
                raise UserError(
                    f"{task}: records made with different {option} ({values.iloc[0]} in {group['path'].iloc[0]}, "
                    f"{values[other]} in {frame['path'][other]}) measure different tokens and cannot share "
                    "a table; tabulate them separately (e.g. one folder each)")


def _setting_shown(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "none"
    return str(int(value)) if isinstance(value, float) else str(value)


def _scored_per_column(frame) -> dict[int, tuple[int, int] | None]:
    scored = {}
    for ctx, group in frame.groupby("ctx"):
        pairs = set(zip(group["tokens"], group["documents"]))
        scored[int(ctx)] = (int(group["tokens"].iloc[0]), int(group["documents"].iloc[0])) if len(pairs) == 1 else None
    return scored


def _attach_reference(grids: list[TaskGrid], reference, metric: str, mode: str) -> None:
    if reference.metric != metric:
        raise UserError(f"{reference.path}: the published rows are {METRICS.get(reference.metric, reference.metric)} "
                        f"figures; show them with --metric {reference.metric}")
    targets = [g for g in grids if g.task in reference.show_with]
    if not targets:
        targets = [TaskGrid(task=reference.task, metric=metric, ctxs=[], rows=[], row_header=ROW_HEADERS[mode])]
        grids.append(targets[0])
    for grid in targets:
        for ref_row in reference.rows:
            grid.published.append(Row(
                label=reference.row_label(ref_row), published=True, model=reference.label,
                pattern=ref_row.pattern, cells={ctx: Cell(value) for ctx, value in ref_row.values.items()},
            ))
        grid.ctxs = sorted(set(grid.ctxs) | {ctx for row in reference.rows for ctx in row.values})
        grid.sources.append(reference.source_line())
