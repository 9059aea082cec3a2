"""The result record: one JSON object per (model, task, pattern, ctx).

Records are written atomically (``files.atomic_write``), so a reader never sees
half a file. Tables and comparisons are built from records alone, without a model.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable

from .errors import UserError
from .files import atomic_write_text

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
    elif record.get("config", {}).get("last_window") == "short":
        name += "__short-last"
    return name + ".json"


def write_record(record: dict, out_dir: str | Path) -> Path:
    path = Path(out_dir) / record_filename(record)
    stored = {key: value for key, value in record.items() if key != "path"}  # "path" is where it was read from
    atomic_write_text(path, json.dumps(stored, indent=2, sort_keys=False) + "\n")
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
    record["path"] = str(path)  # where it was read from, for messages (not part of the stored record)
    return record


def load_records(paths: Iterable[str | Path]) -> list[dict]:
    """Records from files and folders (folders are searched for *.json, recursively).

    A file named twice (directly and through its folder) is read once.
    """
    files: list[Path] = []
    for entry in paths:
        entry = Path(entry)
        if entry.is_dir():
            found = sorted(p for p in entry.rglob("*.json") if not p.name.startswith("."))
            if not found:
                raise UserError(f"{entry}: folder holds no result files (*.json)")
            files.extend(found)
        elif entry.exists():
            files.append(entry)
        else:
            raise UserError(f"{entry}: no such result file or folder")
    records, seen = [], set()
    for path in files:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            records.append(read_record(path))
    return records
