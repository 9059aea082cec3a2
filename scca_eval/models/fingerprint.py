"""Content fingerprints of model files, so a result record says which weights made it.

Method (stored next to every digest):

``sha256``
    every file is hashed in full.
``sha256-sampled``
    at least one file is larger than :data:`FULL_HASH_LIMIT` (1 GiB); such files
    contribute their name, size and the SHA-256 of their first and last MiB instead
    of their full content. This tells apart every real pair of checkpoints we know of
    (fine-tunes change the first shard's bytes) while keeping a 7B model's first
    evaluation from spending a minute on hashing.

A folder's fingerprint is the SHA-256 of the sorted lines ``name<TAB>size<TAB>digest``
of its weight files and ``config.json``. Digests are remembered in
``<cache>/digests.json``, keyed by the file's real path, size and modification time,
so a file is read again only when it changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .cache import cache_root, write_json_atomic

FULL_HASH_LIMIT = 1 << 30
SAMPLE_BYTES = 1 << 20
_BLOCK = 1 << 22

# Files of a Hugging Face model folder that determine its outputs.
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "config.json")

# The digests file of each cache root, as read (and extended) by this process.
_memos: dict[Path, dict[str, dict]] = {}


def _memo_path() -> Path:
    return cache_root() / "digests.json"


def _load_memo() -> dict[str, dict]:
    path = _memo_path()
    if path not in _memos:
        try:
            memo = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            memo = None  # missing or damaged: digests are recomputed
        _memos[path] = memo if isinstance(memo, dict) else {}
    return _memos[path]


def _remember(key: str, entry: dict) -> None:
    memo = _load_memo()
    memo[key] = entry
    try:
        write_json_atomic(_memo_path(), memo)
    except OSError:
        pass  # an unwritable cache only costs recomputation


def _hash_full(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _hash_sampled(path: Path, size: int) -> str:
    digest = hashlib.sha256(f"{path.name}\t{size}\n".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(SAMPLE_BYTES))
        handle.seek(max(0, size - SAMPLE_BYTES))
        digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def file_digest(path: str | os.PathLike, *, full: bool | None = None) -> tuple[str, str]:
    """``(hex digest, method)`` of one file.

    ``full=True`` always hashes the whole file; ``full=None`` hashes files up to
    :data:`FULL_HASH_LIMIT` in full and samples larger ones.
    """
    path = Path(path)
    stat = path.stat()
    sampled = full is False or (full is None and stat.st_size > FULL_HASH_LIMIT)
    method = "sha256-sampled" if sampled else "sha256"
    key = f"{method}:{path.resolve()}"
    entry = _load_memo().get(key)
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["digest"], method
    digest = _hash_sampled(path, stat.st_size) if sampled else _hash_full(path)
    _remember(key, {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "digest": digest})
    return digest, method


def files_fingerprint(paths: list[Path]) -> dict:
    """Fingerprint of a set of files: ``{"digest", "method", "files", "bytes"}``."""
    lines, methods, total = [], set(), 0
    for path in sorted(paths, key=lambda p: p.name):
        digest, method = file_digest(path)
        size = path.stat().st_size
        total += size
        methods.add(method)
        lines.append(f"{path.name}\t{size}\t{digest}\n")
    combined = hashlib.sha256("".join(lines).encode()).hexdigest()
    method = "sha256-sampled" if "sha256-sampled" in methods else "sha256"
    return {"digest": f"sha256:{combined}", "method": method, "files": len(lines), "bytes": total}


def folder_fingerprint(folder: str | os.PathLike, patterns: tuple[str, ...] = WEIGHT_PATTERNS) -> dict:
    """Fingerprint of the files of ``folder`` matching ``patterns`` (not recursive)."""
    folder = Path(folder)
    paths = {path for pattern in patterns for path in folder.glob(pattern) if path.is_file()}
    return files_fingerprint(sorted(paths))
