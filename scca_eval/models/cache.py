"""Where scca-eval keeps converted models and file digests, and how it writes there.

The cache root is ``$SCCA_EVAL_CACHE`` when set, else ``$XDG_CACHE_HOME/scca-eval``
(``~/.cache/scca-eval``). Everything written there is published atomically: a file or
folder is completed under a temporary name in the same parent folder and then renamed
into place, so a killed process never leaves a half-written entry behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from ..files import atomic_write_json, cache_root

__all__ = ["cache_root", "exclusive_lock", "models_cache_dir", "publish_folder", "write_json_atomic"]


def models_cache_dir() -> Path:
    """Folder of converted models (one sub-folder per source file and content hash)."""
    return cache_root() / "models"


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to ``path`` through a temporary file and a rename (OSError when it cannot)."""
    atomic_write_json(path, data, indent=1, sort_keys=True, os_errors=True)


@contextmanager
def exclusive_lock(lock_path: Path):
    """Hold an exclusive lock on ``lock_path`` (POSIX ``flock``; released if the process dies).

    Lets parallel processes (e.g. the ranks of a torchrun job) wait for one conversion
    instead of each doing it. Where ``fcntl`` does not exist the lock is skipped: the
    atomic publish still keeps the cache consistent.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# Temporary folders older than this are leftovers of a killed process.
_STALE_SECONDS = 6 * 3600


@contextmanager
def publish_folder(final: Path):
    """Build a folder under a temporary name, then rename it to ``final``.

    Yields the temporary folder to fill. On success it becomes ``final``; on any
    error it is removed. If another process published ``final`` first, its copy is
    kept and ours discarded (both were made from the same content).
    """
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(parent, final.name)
    partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=parent))
    try:
        yield partial
        try:
            os.replace(partial, final)
        except OSError:
            if not final.is_dir():
                raise
            # Lost the race to another process (rename onto a non-empty folder fails).
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _remove_stale_partials(parent: Path, name: str) -> None:
    now = time.time()
    for leftover in parent.glob(f".{name}.*.partial"):
        try:
            if now - leftover.stat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass
