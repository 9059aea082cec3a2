"""The result record: one JSON object per (model, task, pattern, ctx).

Records are written atomically (a temporary file in the same folder, then
``os.replace``), so a reader never sees half a file. Tables and comparisons
are built from records alone, without a model.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

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


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is a file (so no folder can be made)."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    return ancestor if ancestor.exists() and not ancestor.is_dir() else None


def _unwritable(path: Path, error: OSError | None = None) -> UserError:
    """The one-line message for an output file that cannot be written, saying what to do."""
    if path.is_dir():
        return UserError(f"cannot write {path}: it is a folder; give a file name (e.g. {path / 'out'})")
    blocker = _file_in_the_way(path)
    if blocker is not None:
        return UserError(f"cannot write {path}: {blocker} is a file, not a folder; choose another path")
    if error is not None and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write {path}: permission denied; choose a folder you can write to")
    if error is not None and error.errno == errno.ENOSPC:
        return UserError(f"cannot write {path}: the disk is full; free some space or choose another disk")
    reason = (error.strerror or str(error)) if error is not None else "unknown reason"
    return UserError(f"cannot write {path}: {reason}; choose another path")


def check_output_path(path: str | Path) -> None:
    """Raise :class:`UserError` when ``path`` is a folder or lies under a file. Callers check
    before the work that makes the output, since writing would only fail after it."""
    path = Path(path)
    if path.is_dir() or _file_in_the_way(path) is not None:
        raise _unwritable(path)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(handle)`` so that the file is either old or complete.

    ``write`` fills a temporary file in the same folder, which then replaces ``path``
    (``os.replace`` is atomic within one file system); on any failure the temporary file is
    removed. A destination that cannot be written raises :class:`UserError`.
    """
    path = Path(path)
    check_output_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _unwritable(path, error) from None
    try:
        # mkstemp makes the file private (0600); give it the permissions of a plain open().
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            try:
                write(handle)
            except OSError as error:
                # A full disk shows up inside write(); other OSErrors there are not about the path.
                if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise _unwritable(path, error) from None
                raise
            try:
                handle.flush()
                os.fsync(handle.fileno())
            except OSError as error:
                raise _unwritable(path, error) from None
        try:
            os.replace(tmp, path)
        except OSError as error:
            raise _unwritable(path, error) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` so that the file is either old or complete."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


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


def markdown_tables(records: list[dict], digits: int = 2) -> str:
    """One markdown table per task in the paper's layout (rows: patterns, or model · pattern
    for several models; columns: ctx; best value per column in bold). The end-of-run table of
    `scca-eval ppl` and `scca-eval table` share this renderer (scca_eval.report.tables)."""
    from .report.tables import render_tables

    return render_tables(records, digits=digits)
