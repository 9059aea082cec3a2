"""files.py's writers on a full disk: one line (UserError, so exit 2 in the CLI), no temporary
file left behind, and the file that was there before untouched. The full disk is simulated: a
file handle whose writes fail with ENOSPC, the way a real full disk fails them."""

from __future__ import annotations

import errno
import io
import os

import pytest

from scca_eval.errors import UserError
from scca_eval.files import atomic_path, atomic_write, atomic_write_text

from helpers import run_cli


class _FullDiskFile(io.FileIO):
    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")


def _open_on_full_disk(fd, mode="r", *args, **kwargs):
    # Buffered like a real os.fdopen, so a failed flush leaves bytes behind for close() to flush.
    return io.BufferedWriter(_FullDiskFile(fd, "wb"))


@pytest.fixture
def full_disk(monkeypatch):
    monkeypatch.setattr(os, "fdopen", _open_on_full_disk)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("size", [10, 100_000], ids=["fails-at-flush", "fails-in-write"])
def test_atomic_write_on_a_full_disk_is_one_error_and_keeps_the_old_file(full_disk, tmp_path, size):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(UserError, match="disk is full"):
        atomic_write_text(target, "x" * size)
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_write_when_fsync_fails(monkeypatch, tmp_path):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(UserError, match="disk is full"):
        atomic_write(target, lambda handle: handle.write(b"new"))
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_atomic_path_turns_a_full_disk_in_the_writer_into_one_error(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    with pytest.raises(UserError, match="disk is full"):
        with atomic_path(target) as temp:
            temp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_table_output_on_a_full_disk_is_one_line(full_disk, tmp_path, capsys):
    from test_bad_input import _record

    _record(tmp_path, "a.json", 10.0)
    target = tmp_path / "table.md"
    target.write_text("old")
    code, _, err = run_cli(["table", str(tmp_path / "a.json"), "-o", str(target)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "disk is full" in err and "Traceback" not in err
    assert target.read_text() == "old" and _leftovers(tmp_path) == []


def test_passkey_on_a_full_disk_says_what_the_unsaved_cell_scored(full_disk, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    code, _, err = run_cli(["passkey", "--model", str(tiny_model_dir), "--ctx", "192", "--trials", "1",
                            "--depths", "2", "--device", "cpu", "-q", "--out", str(out)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "disk is full" in err
    assert "not saved: full · ctx 192 scored accuracy" in err
    assert list(out.iterdir()) == []
