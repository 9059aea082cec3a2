"""Result records as a pandas DataFrame, for analysis and for the tables.

``read_records(path)`` gives one row per cell: the settings that identify it (model,
adapter, RoPE scaling, training pattern, task, pattern and its settings, ctx, stride,
protocol, token budget, BOS, dtype) and its metrics as columns. ``per_document=True``
gives one row per (cell, document) with the per-document NLL sums instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from ..records import load_records

METRIC_COLUMNS = ("perplexity", "bits_per_byte", "word_perplexity", "byte_perplexity", "nll_sum", "tokens")


def _text(value) -> str | None:
    """A nested setting (an adapter, a RoPE scaling) as one comparable string, None when unset."""
    if value in (None, {}, ""):
        return None
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _adapter_text(adapter) -> str | None:
    if isinstance(adapter, dict):  # the folder says what it is; the rest is in the record
        return str(adapter.get("path") or adapter.get("id") or _text(adapter))
    return _text(adapter)


def cell_settings(record: dict) -> dict:
    """The settings of a record's cell, flat: what tells two cells apart."""
    config = record.get("config") or {}
    model = config.get("model") or {}
    adapter = model.get("adapter")
    pattern = config.get("pattern") if isinstance(config.get("pattern"), dict) else {}
    return {
        "model": record["model"],
        "adapter": _adapter_text(adapter),
        "rope_scaling": _text(model.get("rope_scaling")),
        "training_pattern": _text(adapter.get("training_pattern")) if isinstance(adapter, dict) else None,
        "task": record["task"],
        "pattern": record["pattern"],
        "pattern_groups": pattern.get("groups"),
        "chunk_size": pattern.get("chunk_size"),
        "dilation": pattern.get("dilation"),
        "ctx": int(record["ctx"]),
        "stride": int(record["stride"]),
        "protocol": config.get("protocol", "stride"),
        "max_tokens": config.get("max_tokens"),
        "add_bos": config.get("add_bos"),
        "dtype": config.get("dtype"),
    }


def _cell_row(record: dict) -> dict:
    metrics = record.get("metrics") or {}
    ci95 = metrics.get("ci95") or (None, None)
    documents = record.get("documents") or []
    return {
        **cell_settings(record),
        **{name: metrics.get(name) for name in METRIC_COLUMNS},
        "documents": len(documents),
        "ci95_low": ci95[0],
        "ci95_high": ci95[1],
        "seconds": (record.get("runtime") or {}).get("seconds"),
        "path": record.get("path"),
    }


def records_frame(records: Sequence[dict], *, per_document: bool = False) -> pd.DataFrame:
    """The DataFrame of already loaded records (see :func:`read_records`)."""
    if not per_document:
        return pd.DataFrame([_cell_row(r) for r in records])
    rows = []
    for record in records:
        settings = cell_settings(record)
        for document in record.get("documents") or []:
            rows.append({**settings, "document": document.get("id"), "nll_sum": document.get("nll_sum"),
                         "tokens": document.get("tokens"), "bytes": document.get("bytes"),
                         "words": document.get("words"), "path": record.get("path")})
    return pd.DataFrame(rows)


def read_records(paths: str | Path | Iterable[str | Path], *, per_document: bool = False) -> pd.DataFrame:
    """Result records from files and folders as a DataFrame: one row per cell (or per
    document of each cell with ``per_document=True``).

    >>> frame = scca_eval.read_records("results/smollm2-135m")
    >>> frame.pivot_table(index="pattern", columns="ctx", values="perplexity")
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    return records_frame(load_records(paths), per_document=per_document)
