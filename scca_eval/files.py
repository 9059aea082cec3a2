"""Files the harness writes or ships: atomic writes and the bundled resource folders.

Every output (records, progress files, caches, tables, plots, masks) is written through
:func:`atomic_write` or :func:`atomic_path`: a temporary file in the same folder that then
replaces the destination (``os.replace`` is atomic within one file system), so a reader
never sees half a file and a failed write leaves the old file as it was.
"""

from __future__ import annotations

import errno
import importlib.resources
import json
import os
import shutil
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .errors import UserError


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


def check_writable_folder(folder: str | Path, option: str = "--out", label: str | None = None) -> None:
    """Raise :class:`UserError` unless files can be made in ``folder`` (or, when it does not
    exist yet, in the nearest folder above it, where it will be made). Tried with a real
    temporary file, so a read-only disk or a permission the user lacks shows before any work."""
    folder = Path(folder)
    label = label or f"{option} {folder}"
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{label} is a file, not a folder; give a folder")
    existing = folder if folder.exists() else folder.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{label}: {existing} is a file, not a folder; choose another path")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".scca-eval-probe-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UserError(f"{label}: cannot write in {existing} ({reason}); choose a folder you can "
                        "write to") from None


def free_space(path: str | Path) -> int:
    """Bytes free on the disk where ``path`` is, or would be made (its nearest existing folder)."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def size_text(size: float) -> str:
    """A number of bytes for a message: ``512 B``, ``1.5 MiB``, ``298.0 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def allocate(path: str | Path, size: int) -> None:
    """Reserve ``size`` bytes of disk for the file ``path`` now. A memory map over a file whose
    blocks are not yet allocated dies of SIGBUS when the disk fills up while it is written;
    allocated first, a full disk is an OSError here instead, which atomic_path reports."""
    if not hasattr(os, "posix_fallocate"):  # e.g. macOS: nothing to reserve with
        return
    with open(path, "r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot
                raise


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], *, os_errors: bool = False) -> None:
    """Write ``path`` through ``write(handle)`` so that the file is either old or complete.

    ``write`` fills a temporary file in the same folder, which then replaces ``path``
    (``os.replace`` is atomic within one file system); on any failure the temporary file is
    removed. A destination that cannot be written raises :class:`UserError`, or with
    ``os_errors=True`` the ``OSError`` itself (caches: their callers treat an unwritable
    cache as a slower run, not as bad input).
    """
    path = Path(path)

    def unwritable(error: OSError | None = None) -> Exception:
        return error if os_errors and error is not None else _unwritable(path, error)

    if not os_errors:
        check_output_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise unwritable(error) from None
    try:
        _plain_permissions(tmp)
        handle = os.fdopen(fd, "wb")
        try:
            try:
                write(handle)
            except OSError as error:
                # A full disk shows up inside write(); other OSErrors there are not about the path.
                if _is_disk_full(error):
                    raise unwritable(error) from None
                raise
            try:
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
            except OSError as error:
                raise unwritable(error) from None
        except BaseException:
            # After a failed write the buffer still holds bytes, and close() would try to flush
            # them again and raise a second OSError over the first; the file is discarded anyway.
            with suppress(OSError):
                handle.close()
            raise
        try:
            os.replace(tmp, path)
        except OSError as error:
            raise unwritable(error) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, *, os_errors: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` so that the file is either old or complete."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")), os_errors=os_errors)


def atomic_write_json(path: str | Path, data, indent: int = 2, sort_keys: bool = False, *,
                      os_errors: bool = False) -> None:
    """Write ``data`` as JSON to ``path`` so that the file is either old or complete."""
    atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n", os_errors=os_errors)


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path next to ``path`` for writers that want a file name (matplotlib,
    numpy memory maps); it replaces ``path`` when the block ends without an error, and is
    removed otherwise."""
    path = Path(path)
    check_output_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
    except OSError as error:
        raise _unwritable(path, error) from None
    try:
        _plain_permissions(tmp)
        try:
            yield Path(tmp)
        except OSError as error:
            # A full disk shows up inside the writer; other OSErrors there are not about the path.
            if _is_disk_full(error):
                raise _unwritable(path, error) from None
            raise
        try:
            os.replace(tmp, path)
        except OSError as error:
            raise _unwritable(path, error) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_disk_full(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _plain_permissions(tmp: str) -> None:
    # mkstemp makes the file private (0600); give it the permissions of a plain open().
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


def cache_root() -> Path:
    """The scca-eval cache folder (not created here): ``$SCCA_EVAL_CACHE`` when set, else
    ``$XDG_CACHE_HOME/scca-eval`` (``~/.cache/scca-eval``). Converted models, token ids and
    built corpora live under it."""
    configured = os.environ.get("SCCA_EVAL_CACHE")
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "scca-eval"


def bundled_folder(package: str, checkout: str) -> Path | None:
    """A data folder shipped with scca-eval: installed, the package ``package`` (e.g.
    ``scca_eval.tasks``); in a source checkout, the folder ``checkout`` (e.g. ``tasks``)
    next to the ``scca_eval`` folder. None when neither exists."""
    try:
        root = Path(str(importlib.resources.files(package)))
        if root.is_dir():
            return root
    except (ModuleNotFoundError, TypeError):
        pass
    folder = Path(__file__).resolve().parents[1] / checkout
    return folder if folder.is_dir() else None
