"""Progress files: what a cell has finished, per document, so a stopped run can continue.

While a cell runs, its windows are scored in groups; after each group the NLL sums of
the documents finished so far — and of the document in progress, with the number of its
windows done, so that a long document keeps its finished windows — are written to ``<record>.progress`` next to the record
(``default__pg19_sample__full__ctx1024.json.progress``), atomically. The record's name is
``records.record_path``'s, which leaves a name that a stopped run of another model keeps
(:func:`stopped_runs`) to it, so two models never share a progress file (a stopped run of the
same model with other settings is out of date: its file is replaced, with a warning). Running the same
command again reads the file and scores only the documents it lacks; once the record is
written, the progress file is removed. (The name does not end in ``.json``, so ``table``,
``compare`` and sweeps never mistake it for a record.)

A progress file is trusted only when everything about it checks out: it parses, carries
this format, its checksum matches its content, it was made with exactly this cell's
configuration (:func:`cell_key`), and every document in it is one of this cell's, with the
number of scored tokens this cell gives it. Anything else is reported in one line and the
cell starts over; a number from a damaged or foreign file never reaches a record.

Floats are stored as JSON numbers written with Python's shortest round-trip ``repr``, so a
resumed run ends with the same float64 sums, bit for bit, as one that was never stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..files import atomic_write_text

FORMAT = "scca-eval progress"
VERSION = 2  # 2: documents may be saved part-way (groups no longer end at documents)
SUFFIX = ".progress"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says what was saved and how to continue."""


@dataclass(frozen=True)
class DocumentDone:
    """A document of a cell, scored: its index in the task, id, NLL sum and scored tokens;
    ``windows`` is None when the document is finished, else the number of its first windows
    that the sums cover (a long document saved part-way); ``window_nll`` and
    ``window_tokens`` are the sums of those windows one by one, in order (empty when not kept)."""

    index: int
    id: str
    nll_sum: float
    tokens: int
    windows: int | None = None
    window_nll: tuple[float, ...] = ()
    window_tokens: tuple[int, ...] = ()

    @property
    def finished(self) -> bool:
        return self.windows is None


def progress_path(record_path: str | Path) -> Path:
    record_path = Path(record_path)
    return record_path.with_name(record_path.name + SUFFIX)


def stopped_runs(folder: str | Path | None) -> dict[Path, dict]:
    """The stopped runs whose progress files are in ``folder``: the path of the record each one
    is kept for -> the cell identity it was made with (its key without the count of scored
    tokens). ``records.record_path`` leaves those names to them, so that another cell whose
    record would have the same name (two models whose folders have one name) never writes over
    a stopped run's progress. A file that is not a whole progress file claims no name."""
    runs: dict[Path, dict] = {}
    if folder is None or not Path(folder).is_dir():
        return runs
    for path in Path(folder).glob("*.json" + SUFFIX):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        key = data.get("key") if isinstance(data, dict) and data.get("format") == FORMAT else None
        if isinstance(key, dict) and data.get("checksum") == _checksum(key, data.get("documents"), data.get("seconds")):
            runs[Path(folder) / path.name[:-len(SUFFIX)]] = {name: value for name, value in key.items()
                                                             if name != "scored_tokens"}
    return runs


def _checksum(key: dict, documents: list, seconds) -> str:
    text = json.dumps({"key": key, "documents": documents, "seconds": seconds}, sort_keys=True, allow_nan=True)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def _differing(saved: dict, wanted: dict) -> list[str]:
    keys = sorted(set(saved) | set(wanted))
    return [key for key in keys if json.dumps(saved.get(key), sort_keys=True) != json.dumps(wanted.get(key), sort_keys=True)]


class ProgressFile:
    """The progress of one cell. ``key``: the cell's configuration (JSON-ready dict);
    ``expected``: per document index, ``(id, tokens to score)`` for every document the
    cell scores; ``warn``: receives one line when a file is found but not trusted."""

    def __init__(self, path: str | Path, key: dict, expected: dict[int, tuple[str, int]],
                 warn: Callable[[str], None]):
        self.path = Path(path)
        self.key = json.loads(json.dumps(key, sort_keys=True, default=str))  # as it reads back
        self.expected = expected
        self.warn = warn
        self.loaded_seconds = 0.0  # scoring time of the runs that wrote the file

    # -- reading ---------------------------------------------------------------
    def load(self) -> dict[int, DocumentDone]:
        """The documents a previous run finished, or ``{}`` (no file, or one not to trust)."""
        if not self.path.exists():
            return {}
        try:
            return self._read()
        except _Untrusted as reason:
            self.warn(f"ignoring the progress file {self.path}: {reason}; its documents will be scored again")
            return {}

    def _read(self) -> dict[int, DocumentDone]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as error:
            raise _Untrusted(f"it cannot be read ({type(error).__name__})") from None
        except json.JSONDecodeError as error:
            raise _Untrusted(f"it is not complete JSON ({error.msg} at line {error.lineno})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise _Untrusted("it is not a scca-eval progress file")
        if data.get("version") != VERSION:
            raise _Untrusted(f"it has format version {data.get('version')!r}, not {VERSION}")
        key, documents, seconds = data.get("key"), data.get("documents"), data.get("seconds")
        if not isinstance(key, dict) or not isinstance(documents, list):
            raise _Untrusted("it lacks its configuration or its documents")
        if data.get("checksum") != _checksum(key, documents, seconds):
            raise _Untrusted("its checksum does not match its content (the file was changed or damaged)")
        if key != self.key:
            raise _Untrusted(f"it was made with other settings (differing: {', '.join(_differing(key, self.key))})")
        done: dict[int, DocumentDone] = {}
        for entry in documents:
            done_doc = self._document(entry)
            if done_doc.index in done:
                raise _Untrusted(f"document {done_doc.index} appears twice")
            done[done_doc.index] = done_doc
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds):
            self.loaded_seconds = max(0.0, float(seconds))
        return done

    def _document(self, entry) -> DocumentDone:
        # [index, id, nll_sum, tokens], + [windows done] when saved part-way, or
        # + [windows done or null, [window nll sums], [window tokens]] when window sums are kept
        if not (isinstance(entry, list) and len(entry) in (4, 5, 7)):
            raise _Untrusted(f"a document entry is malformed ({str(entry)[:60]})")
        index, doc_id, nll_sum, tokens = entry[:4]
        windows = entry[4] if len(entry) >= 5 else None  # a document saved part-way
        window_nll, window_tokens = entry[5:] if len(entry) == 7 else ([], [])
        if isinstance(index, bool) or not isinstance(index, int) or index not in self.expected:
            raise _Untrusted(f"document index {index!r} is not one of this cell's documents")
        want_id, want_tokens = self.expected[index]
        if doc_id != want_id:
            raise _Untrusted(f"document {index} is {doc_id!r} there but {want_id!r} here")
        if windows is not None:
            if isinstance(windows, bool) or not isinstance(windows, int) or windows < 1:
                raise _Untrusted(f"document {want_id!r} has an impossible count of finished windows {windows!r}")
            if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens < want_tokens:
                raise _Untrusted(f"document {want_id!r} is saved part-way with {tokens!r} scored tokens, "
                                 f"not between 1 and {want_tokens - 1}")
        elif isinstance(tokens, bool) or not isinstance(tokens, int) or tokens != want_tokens:
            raise _Untrusted(f"document {want_id!r} has {tokens!r} scored tokens there but {want_tokens} here")
        if isinstance(nll_sum, bool) or not isinstance(nll_sum, (int, float)) or not math.isfinite(nll_sum) \
                or nll_sum < 0:
            raise _Untrusted(f"document {want_id!r} has an impossible NLL sum {nll_sum!r}")
        if len(entry) == 7 and not _valid_windows(window_nll, window_tokens, tokens, windows):
            raise _Untrusted(f"document {want_id!r} has per-window sums that do not add up")
        return DocumentDone(index, doc_id, float(nll_sum), tokens, windows, tuple(float(x) for x in window_nll),
                            tuple(window_tokens))

    # -- writing ---------------------------------------------------------------
    def save(self, done: Iterable[DocumentDone], seconds: float = 0.0) -> None:
        """Write the documents scored so far (finished or part-way) and the scoring time spent."""
        seconds = round(float(seconds), 3)
        documents = [[d.index, d.id, d.nll_sum, d.tokens]
                     + ([d.windows, list(d.window_nll), list(d.window_tokens)] if d.window_tokens
                        else [] if d.finished else [d.windows])
                     for d in sorted(done, key=lambda d: d.index)]
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "key": self.key,
            "documents": documents,
            "seconds": seconds,
            "checksum": _checksum(self.key, documents, seconds),
        }
        atomic_write_text(self.path, json.dumps(payload, indent=1, allow_nan=True) + "\n")

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def remove_progress(records: Iterable[dict]) -> None:
    """Remove the progress files of written records (``evaluate(..., keep_progress=True)``)."""
    for record in records:
        if record.get("path"):
            progress_path(record["path"]).unlink(missing_ok=True)


def _valid_windows(window_nll, window_tokens, tokens, windows) -> bool:
    if not (isinstance(window_nll, list) and isinstance(window_tokens, list)
            and len(window_nll) == len(window_tokens)):
        return False
    if windows is not None and len(window_tokens) != windows:
        return False
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in window_tokens):
        return False
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) for x in window_nll):
        return False
    return sum(window_tokens) == tokens


class _Untrusted(Exception):
    """Why a progress file is not used."""
