"""The result record: one JSON object per (model, task, pattern, ctx).

Records are written atomically (a temporary file in the same folder, then
``os.replace``), so a reader never sees half a file. Tables and comparisons
are built from records alone, without a model.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable

from .errors import UserError

SCHEMA_VERSION = 1
REQUIRED_KEYS = ("model", "task", "pattern", "ctx", "stride", "metrics", "documents", "config", "runtime")


def slug(text: str) -> str:
    """A file-name-safe form of a model id or path."""
    text = text.rstrip("/").split("/")[-1] if "/" in text and os.path.exists(text) else text
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def record_filename(record: dict) -> str:
    name = f"{slug(record['model'])}__{record['task']}__{record['pattern']}__ctx{record['ctx']}"
    if record["stride"] != record["ctx"]:
        name += f"__stride{record['stride']}"
    protocol = record.get("config", {}).get("protocol", "stride")
    if protocol != "stride":
        name += f"__{protocol}"
    return name + ".json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that the file is either old or complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_record(record: dict, out_dir: str | Path) -> Path:
    path = Path(out_dir) / record_filename(record)
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path


def read_record(path: str | Path) -> dict:
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such result file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not a valid result file ({error}); re-run the evaluation that wrote it") from None
    if not isinstance(record, dict) or any(key not in record for key in REQUIRED_KEYS):
        missing = [key for key in REQUIRED_KEYS if not isinstance(record, dict) or key not in record]
        raise UserError(f"{path}: not a scca-eval result record (missing {', '.join(missing)})")
    return record


def load_records(paths: Iterable[str | Path]) -> list[dict]:
    """Records from files and folders (folders are searched for *.json, recursively)."""
    records = []
    for entry in paths:
        entry = Path(entry)
        if entry.is_dir():
            files = sorted(p for p in entry.rglob("*.json") if not p.name.startswith("."))
            if not files:
                raise UserError(f"{entry}: folder holds no result files (*.json)")
            records.extend(read_record(p) for p in files)
        else:
            records.append(read_record(entry))
    return records


def _format_cell(record: dict, digits: int) -> str:
    return f"{record['metrics']['perplexity']:.{digits}f}"


def markdown_tables(records: list[dict], digits: int = 2) -> str:
    """One markdown table per task: rows model · pattern, columns ctx."""
    by_task: dict[str, list[dict]] = {}
    for record in records:
        by_task.setdefault(record["task"], []).append(record)
    blocks = []
    for task, rows in by_task.items():
        ctxs = sorted({r["ctx"] for r in rows})
        row_keys = list(dict.fromkeys((r["model"], r["pattern"]) for r in rows))
        cells = {(r["model"], r["pattern"], r["ctx"]): r for r in rows}
        lines = [f"**{task}** — token perplexity (lower is better)", ""]
        lines.append("| model | pattern | " + " | ".join(str(c) for c in ctxs) + " |")
        lines.append("| --- | --- | " + " | ".join("---:" for _ in ctxs) + " |")
        for model, pattern in row_keys:
            values = [
                _format_cell(cells[(model, pattern, c)], digits) if (model, pattern, c) in cells else "–"
                for c in ctxs
            ]
            lines.append(f"| {model} | {pattern} | " + " | ".join(values) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
