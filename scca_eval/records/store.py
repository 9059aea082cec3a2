"""Record files: their names, writing, reading, and the records a folder already holds.

A cell record is one JSON object per (model, task, pattern, ctx). Records are written
atomically (``files.atomic_write``), so a reader never sees half a file. Tables and
comparisons are built from records alone, without a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable

from ..choices import DEFAULT_DILATION, PASSKEY_DEPTHS, PASSKEY_SEED, PASSKEY_TRIALS
from ..errors import UserError
from ..files import atomic_write_text
from .build import TRAINING_RECORD_KIND
from .identity import (config_key, identities_difference, identity_difference, identity_of, is_passkey_record,
                       record_identity)

REQUIRED_KEYS = ("model", "task", "pattern", "ctx", "stride", "metrics", "documents", "config", "runtime")
# The "format" of the JSON report of `scca-eval compare --json`: a folder being read skips it
# (it may be written next to the records it compares), so it is never mistaken for a record.
COMPARE_REPORT_FORMAT = "scca-eval compare"


def slug(text: str) -> str:
    """A file-name-safe form of a model id or path."""
    text = text.rstrip("/").split("/")[-1] if "/" in text and os.path.exists(text) else text
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def record_filename(record: dict) -> str:
    """``model__task__pattern__ctx`` and, after it, a readable tag for every setting of the
    record's identity that differs from the plain run (stride, protocol, last window, adapter,
    RoPE scaling, chunk size, dilation, BOS, token budget, dtype), so that two cells that
    differ in any of them never share a file. What no tag names (two models whose folders have
    the same name, two data sets of one task name) is kept apart by ``write_record``."""
    name = f"{slug(record['model'])}__{record['task']}__{record['pattern']}__ctx{record['ctx']}"
    if record["stride"] != record["ctx"]:
        name += f"__stride{record['stride']}"
    protocol = record.get("config", {}).get("protocol", "stride")
    if protocol not in ("stride", "passkey"):
        name += f"__{protocol}"
    elif record.get("config", {}).get("last_window") == "short":
        name += "__short-last"
    return name + "".join(f"__{tag}" for tag in identity_tags(record)) + ".json"


def identity_tags(record: dict) -> list[str]:
    """The file-name tags of the settings that differ from a plain run (see record_filename)."""
    config = record.get("config") or {}
    model = config.get("model") or {}
    tags = []
    adapter = model.get("adapter")
    if isinstance(adapter, dict):
        folder = slug(Path(adapter.get("path") or "adapter").name)
        tags.append(f"adapter-{folder}-{_short_digest(adapter.get('fingerprint'))}")
    rope = model.get("rope_scaling")
    if isinstance(rope, dict) and rope.get("source") == "option":
        tags.append("rope-" + slug(str(rope.get("requested") or rope.get("rope_type") or "scaled").replace(":", "-")))
    tags += _pattern_tags(config.get("pattern"))
    if config.get("add_bos"):
        tags.append("bos")
    if config.get("max_tokens") is not None:
        tags.append(f"max{config['max_tokens']}")
    if config.get("dtype") not in (None, "float32"):
        tags.append(str(config["dtype"]))
    passkey = config.get("passkey")
    if isinstance(passkey, dict):
        settings = (passkey.get("trials_per_depth"), passkey.get("depths"), passkey.get("seed"))
        if settings != (PASSKEY_TRIALS, PASSKEY_DEPTHS, PASSKEY_SEED):
            tags.append("trials{}-depths{}-seed{}".format(*settings))
    return tags


def _pattern_tags(pattern) -> list[str]:
    """Chunk size, chunk ratio and dilation where they differ from the pattern's defaults."""
    from ..patterns.spec import DEFAULT_CHUNK_RATIO  # here: patterns/ imports torch, reading records need not

    if not isinstance(pattern, dict):
        return []
    tags = []
    if pattern.get("chunk_size") is not None:
        tags.append(f"G{pattern['chunk_size']}")
    elif pattern.get("chunk_ratio") not in (None, str(DEFAULT_CHUNK_RATIO)):
        tags.append("G" + str(pattern["chunk_ratio"]).replace("/", "-"))
    if pattern.get("name") == "sda" and pattern.get("dilation") not in (None, DEFAULT_DILATION):
        tags.append(f"r{pattern['dilation']}")  # a custom mix names its rates in its groups (its hash)
    return tags


def _short_digest(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:6]


def write_record(record: dict, out_dir: str | Path, say=None, *, stopped: dict | None = None) -> Path:
    """Write ``record`` into ``out_dir`` at ``record_path``, atomically: a file that holds a record
    of another identity (a setting no file-name tag names), or the name a stopped run of
    another identity keeps (``stopped``), is left alone."""
    path = record_path(record, out_dir, say, stopped=stopped)
    stored = {key: value for key, value in record.items() if key != "path"}  # "path" is where it was read from
    atomic_write_text(path, json.dumps(stored, indent=2, sort_keys=False) + "\n")
    return path


def record_path(record: dict, out_dir: str | Path, say=None, *, stopped: dict | None = None) -> Path:
    """Where a cell's record goes in ``out_dir`` (and, while the cell runs, the name its progress
    file is kept under): a file of the cell's name family that holds its identity, else
    record_filename. A name taken by a record of another identity (a setting no file-name tag
    names: two models whose folders have the same name), or kept by a stopped run of another
    model, is left to it: this record goes to that name with a digest of its identity
    added, and ``say`` is told. ``stopped``: record path -> the ``record_identity`` (as JSON
    reads it back) of each stopped run whose progress file is in the folder
    (``evaluation.resume.stopped_runs``)."""
    path = Path(out_dir) / record_filename(record)
    stored = {key: value for key, value in record.items() if key != "path"}
    stopped = stopped or {}
    identity = json.loads(json.dumps(record_identity(stored), default=str)) if stopped else None
    same = _file_of_same_identity(path, stored, stopped, identity)
    if same is not None:
        return same
    if path.exists():
        difference, holder = _difference_from_file(path, stored), "holds a record"
    else:
        claim = stopped.get(path)
        # Only another model's stopped run (another id, weights, adapter or RoPE scaling) keeps its
        # name. A stopped run of this model with other settings (the data edited, another
        # --max-tokens) is out of date: the cell takes its name, and the progress file is
        # replaced with a warning, as it always was.
        of_another_model = claim is not None and claim.get("model") != identity["model"]
        difference = identities_difference(claim, identity) if of_another_model else None
        holder = "is kept for a stopped run of another model (its progress file is next to it)"
    if not difference:
        return path
    digest_path = path.with_name(f"{path.stem}__{_identity_digest(stored)}.json")
    if say is not None:
        say(f"note: {path} {holder} that differs in {difference}; this one is written to {digest_path.name}")
    return digest_path


def _file_of_same_identity(path: Path, record: dict, stopped: dict, identity) -> Path | None:
    """An existing file of the cell's name family (``model__task__pattern__ctx…``) that holds a
    record of the same identity under another name (written before the name carried its
    tags, or under a digest name), or the name of a stopped run of the same identity: a run
    again replaces that record, or continues that run, rather than adding a twin."""
    stem = f"{slug(record['model'])}__{record['task']}__{record['pattern']}__ctx{record['ctx']}"
    for candidate in sorted(path.parent.glob(f"{stem}*.json")):
        if candidate != path and _difference_from_file(candidate, record) is None \
                and _readable(candidate):
            return candidate
    for candidate, claim in sorted(stopped.items()):
        if candidate != path and candidate.name.startswith(stem) and not candidate.exists() \
                and identities_difference(claim, identity) is None:
            return candidate
    return None


def _readable(path: Path) -> bool:
    try:
        read_record(path)
        return True
    except UserError:
        return False


def _difference_from_file(path: Path, record: dict) -> str | None:
    try:
        existing = read_record(path)
    except UserError:
        return None  # not a readable record: nothing of value is replaced
    try:
        return identity_difference(existing, record)
    except (KeyError, TypeError, AttributeError):
        return "its settings (the file is of an older or other kind)"


def _identity_digest(record: dict) -> str:
    return _short_digest(identity_of(record))[:8]


def read_record(path: str | Path) -> dict:
    return _as_record(_parsed(Path(path)), Path(path))


def _parsed(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such result file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not a valid result file ({error}); re-run the evaluation that wrote it") from None


def _other_output(parsed, path: Path) -> str | None:
    """What ``parsed`` is when it is one of the other JSON files scca-eval writes, which may lie
    in a results folder (a compare report beside the runs, a fine-tune run's folder); else None."""
    if not isinstance(parsed, dict) or all(key in parsed for key in REQUIRED_KEYS):
        return None
    # a compare report also before it carried its format
    if parsed.get("format") == COMPARE_REPORT_FORMAT or {"cells", "only_base", "only_new"} <= set(parsed):
        return "a report of scca-eval compare --json"
    if parsed.get("kind") == TRAINING_RECORD_KIND:
        return "the training record of a fine-tune run"
    if path.name == "adapter_config.json" and "peft_type" in parsed:
        return "a LoRA adapter's config"
    return None


def kept_output(path: str | Path) -> str | None:
    """What ``path`` holds when it is a file of scca-eval that nothing may write over: "a scca-eval result
    record", "the training record of a fine-tune run" or "a LoRA adapter's config". None for
    anything else: no file, another file, a compare report (a report may replace a report)."""
    path = Path(path)
    try:
        parsed = _parsed(path)
    except (UserError, OSError):
        return None
    other = _other_output(parsed, path)
    if other:
        return None if other.startswith("a report") else other
    try:
        _as_record(parsed, path)
    except UserError:
        return None
    return "a scca-eval result record"


def _as_record(record, path: Path) -> dict:
    other = _other_output(record, path)
    if other:
        raise UserError(f"{path}: {other}, not a result record; give result records (the folder or files "
                        "that ppl, sweep or passkey wrote)")
    if not isinstance(record, dict) or any(key not in record for key in REQUIRED_KEYS):
        missing = [key for key in REQUIRED_KEYS if not isinstance(record, dict) or key not in record]
        raise UserError(f"{path}: not a scca-eval result record (missing {', '.join(missing)})")
    wrong = _wrongly_typed_field(record)
    if wrong:
        raise UserError(f"{path}: not a valid result record ({wrong}); re-run the evaluation that wrote it")
    _without_chunks_for_full_attention(record)
    record["path"] = str(path)  # where it was read from, for messages (not part of the stored record)
    return record


# What PatternSpec.to_dict stores for full attention, and the default chunk ratio it stores
# (patterns.spec.DEFAULT_CHUNK_RATIO; not imported: patterns/ imports torch, reading records does not).
FULL_ATTENTION_GROUPS = "1 causal"
DEFAULT_CHUNK_RATIO_TEXT = "1/4"


def _without_chunks_for_full_attention(record: dict) -> None:
    """Full attention has no chunks. Records made before --chunk-size was dropped for it
    (``--pattern full,s2 --chunk-size N``) stored N: read as full attention's plain settings,
    they are the same cell as a record made without it (tables, compare, sweeps, names)."""
    pattern = record["config"].get("pattern")
    if isinstance(pattern, dict) and pattern.get("groups") == FULL_ATTENTION_GROUPS:
        pattern["chunk_size"], pattern["chunk_ratio"] = None, DEFAULT_CHUNK_RATIO_TEXT


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# The type of each field that tables, compare and plot read, checked once where a record is
# read, so that a damaged or hand-edited file is refused in one line instead of failing at its use.
_FIELD_TYPES = (
    ("model", lambda v: isinstance(v, str), "text"),
    ("task", lambda v: isinstance(v, str), "text"),
    ("pattern", lambda v: isinstance(v, str), "text"),
    ("ctx", lambda v: _is_whole(v) and v > 0, "a whole number above 0"),
    ("stride", lambda v: _is_whole(v) and v > 0, "a whole number above 0"),
    ("metrics", lambda v: isinstance(v, dict), "an object"),
    ("documents", lambda v: isinstance(v, list) and all(isinstance(d, dict) for d in v), "a list of objects"),
    ("config", lambda v: isinstance(v, dict), "an object"),
    ("runtime", lambda v: v is None or isinstance(v, dict), "an object"),
)
_CONFIG_OBJECTS = ("model", "versions", "pattern")  # nested objects of config the readers look into
_DOCUMENT_TYPES = (  # a perplexity record's documents (a passkey record's are its trials)
    ("id", lambda v: isinstance(v, (str, int)) and not isinstance(v, bool), "text or a whole number"),
    ("nll_sum", _is_number, "a number"),
    ("tokens", lambda v: _is_whole(v) and v >= 0, "a whole number"),
)


def _wrongly_typed_field(record: dict) -> str | None:
    """The first field of ``record`` whose value has the wrong type, described, or None."""
    for key, valid, wanted in _FIELD_TYPES:
        if not valid(record[key]):
            return f"field {key!r} is {json.dumps(record[key])[:40]}, not {wanted}"
    config = record["config"]
    for key in _CONFIG_OBJECTS:
        if config.get(key) is not None and not isinstance(config[key], dict):
            return f"field 'config.{key}' is {json.dumps(config[key])[:40]}, not an object"
    ci95 = record["metrics"].get("ci95")
    if ci95 is not None and not (isinstance(ci95, list) and len(ci95) == 2):
        return f"field 'metrics.ci95' is {json.dumps(ci95)[:40]}, not a pair of numbers"
    if not is_passkey_record(record):
        for index, document in enumerate(record["documents"]):
            for key, valid, wanted in _DOCUMENT_TYPES:
                if not valid(document.get(key)):
                    return (f"field 'documents[{index}].{key}' is {json.dumps(document.get(key))[:40]}, "
                            f"not {wanted}")
    return None


def load_records(paths: Iterable[str | Path]) -> list[dict]:
    """Records from files and folders (folders are searched for *.json, recursively; the other
    JSON files scca-eval writes, a ``compare --json`` report or a fine-tune run's
    ``training.json`` and ``adapter_config.json``, are passed over there).

    A file named twice (directly and through its folder) is read once.
    """
    files: list[tuple[Path, Path | None]] = []  # each file, and the folder it was found in (None: named)
    for entry in paths:
        entry = Path(entry)
        if entry.is_dir():
            found = sorted(p for p in entry.rglob("*.json") if not p.name.startswith("."))
            if not found:
                raise UserError(f"{entry}: folder holds no result files (*.json) yet; write some first, e.g. "
                                f"`scca-eval ppl --out {entry}` (or `sweep`, `passkey` with --out {entry})")
            files.extend((path, entry) for path in found)
        elif entry.exists():
            files.append((entry, None))
        else:
            raise UserError(f"{entry}: no such result file or folder")
    records, seen = [], set()
    passed_over: dict[Path, set[str]] = {}  # folder -> what was passed over in it
    read_from: set[Path] = set()  # folders that gave records
    for path, folder in files:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            parsed = _parsed(path)
            other = _other_output(parsed, path) if folder is not None else None
            if other:  # e.g. a compare report or a fine-tune run in a results folder; named directly, refused
                passed_over.setdefault(folder, set()).add(other)
                continue
            records.append(_as_record(parsed, path))
            read_from.add(folder)
    for folder, kinds in passed_over.items():
        if folder not in read_from:
            raise UserError(f"{folder}: folder holds no result records, only {' and '.join(sorted(kinds))}; give "
                            "the folder or files of the records that ppl, sweep or passkey wrote")
    return records


def existing_records(folder: str | Path, say, *, passkey: bool = False) -> dict[str, dict]:
    """``config_key`` -> record, for the readable records of one kind (perplexity, or passkey
    with ``passkey``) in ``folder``: the cells a sweep or a passkey run reuses rather than
    running again. A file that cannot be read as a record is told to ``say`` and left out."""
    found: dict[str, dict] = {}
    folder = Path(folder)
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            parsed = _parsed(path)
            if _other_output(parsed, path):
                continue  # a report or a fine-tune run's file, no cell's record
            record = _as_record(parsed, path)
            if is_passkey_record(record) == passkey:
                found[config_key(record)] = record
        except (UserError, KeyError, TypeError, AttributeError) as error:
            say(f"ignoring {path}: {error}; its cell will be run again")
    return found


def write_training_record(folder: str | Path, record: dict) -> Path:
    """Write ``training.json`` (``build.training_record``) into an adapter folder, atomically."""
    from ..models.adapters import TRAINING_RECORD  # the name ppl --adapter reads it under

    path = Path(folder) / TRAINING_RECORD
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path
