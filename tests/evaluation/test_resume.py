"""Resume after a crash, Ctrl-C, untrusted progress files, out-of-memory messages, determinism.

The reference is an uninterrupted run; a stopped and resumed run must end with the same
record, bit for bit (same float64 per-document sums) on the CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scca_eval.api import evaluate
from scca_eval.cli import main
from scca_eval.errors import UserError
from scca_eval.evaluation.resume import Interrupted
from conftest import sample_slice

REPO = Path(__file__).resolve().parents[2]
DOCS = 6
RECORD = "tiny__docs__full__ctx16__stride8.json"
PROGRESS = RECORD + ".progress"


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    # A fixed model name, so the record file name is known.
    link = tmp_path_factory.mktemp("models") / "tiny"
    link.symlink_to(tiny_model_dir, target_is_directory=True)
    return link


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory):
    """Six documents of different lengths, each saved in two to four pieces with --save-every 16."""
    folder = tmp_path_factory.mktemp("resume") / "docs"
    folder.mkdir()
    text = sample_slice("pg19_sample/carroll_alice.txt", 40000)
    for i in range(DOCS):
        (folder / f"doc{i}.txt").write_text(text[i * 5000: i * 5000 + 1200 + 300 * i], encoding="utf-8")
    return folder


def ppl_args(model_dir, docs_dir, out, *extra):
    # ctx 16 with stride 8: many small windows, so a run lasts long enough to be stopped
    # part-way; --save-every 16 saves after about 16 batches of two windows, a few times per document.
    return ["ppl", "--model", str(model_dir), "--data", str(docs_dir), "--ctx", "16", "--stride", "8",
            "--batch-size", "2", "--save-every", "16", "--device", "cpu", "-q", "--out", str(out), *extra]


def api_options(model_dir, docs_dir, out, **extra):
    return dict(model=str(model_dir), data=[str(docs_dir)], ctx=16, stride=8, batch_size=2, save_every=16,
                device="cpu", out=None if out is None else str(out), **extra)


def run_main(args):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


@pytest.fixture(scope="module")
def reference(model_dir, docs_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    assert run_main(ppl_args(model_dir, docs_dir, out)) == 0
    assert not (out / PROGRESS).exists()  # removed once the record is written
    return json.loads((out / RECORD).read_text())


def same_numbers(record, reference):
    assert record["documents"] == reference["documents"]  # float64 sums, compared exactly
    assert record["metrics"] == reference["metrics"]


def saved_documents(path: Path) -> int:
    """Finished documents in a progress file (a document saved part-way has the count of its
    windows done as a fifth field; null for a finished one that keeps its window sums)."""
    try:
        return sum(len(entry) == 4 or (len(entry) == 7 and entry[4] is None)
                   for entry in json.loads(path.read_text())["documents"])
    except (OSError, ValueError, KeyError):
        return 0  # not written yet


def start_and_stop(args, progress: Path, sig, at_least: int, cwd):
    """Run the CLI in a subprocess and send it ``sig`` once ``at_least`` documents are saved."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # A shell starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the child the default disposition, as a terminal would.
    process = subprocess.Popen([sys.executable, "-m", "scca_eval", *args], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if saved_documents(progress) >= at_least:
                process.send_signal(sig)
                break
            time.sleep(0.01)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, out, err


def test_killed_run_continues_where_it_stopped(model_dir, docs_dir, reference, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = start_and_stop(ppl_args(model_dir, docs_dir, out), out / PROGRESS, signal.SIGKILL, 2, tmp_path)
    assert code == -signal.SIGKILL, err[-2000:]
    saved = saved_documents(out / PROGRESS)
    assert 2 <= saved < DOCS, "the run was not stopped part-way"
    assert not (out / RECORD).exists()

    capsys.readouterr()
    assert run_main(ppl_args(model_dir, docs_dir, out)) == 0
    err = capsys.readouterr().err
    assert f"{saved} of {DOCS} documents are done" in err
    record = json.loads((out / RECORD).read_text())
    assert record["runtime"]["resumed_documents"] == saved
    same_numbers(record, reference)
    assert not (out / PROGRESS).exists()


def test_ctrl_c_saves_progress_and_exits_130(model_dir, docs_dir, reference, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = start_and_stop(ppl_args(model_dir, docs_dir, out), out / PROGRESS, signal.SIGINT, 1,
                                       tmp_path)
    assert code == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    assert "run the same command again to continue" in lines[0] and str(out / PROGRESS) in lines[0]
    assert saved_documents(out / PROGRESS) >= 1 and not (out / RECORD).exists()
    assert stdout == ""  # no table for an unfinished run

    record = evaluate(**api_options(model_dir, docs_dir, out), notify=lambda line: None)[0]
    assert record["runtime"]["resumed_documents"] >= 1
    same_numbers(record, reference)


class StopAfter:
    """An api.Progress that raises ``error`` once ``tokens`` targets have been scored."""

    def __init__(self, tokens: int, error: BaseException):
        self.tokens, self.error, self.seen = tokens, error, 0

    def begin(self, label, total_tokens, done_tokens=0):
        pass

    def advance(self, tokens):
        self.seen += tokens
        if self.seen >= self.tokens:
            raise self.error

    def end(self):
        pass


def half(record) -> int:
    return sum(d["tokens"] for d in record["documents"]) // 2


def partial_progress(model_dir, docs_dir, out, reference) -> Path:
    """A genuine progress file of a run stopped (Ctrl-C) after about half the work."""
    with pytest.raises(Interrupted, match="run the same command again"):
        evaluate(**api_options(model_dir, docs_dir, out), progress=StopAfter(half(reference), KeyboardInterrupt()))
    assert 1 <= saved_documents(out / PROGRESS) < DOCS
    return out / PROGRESS


@pytest.fixture(scope="module")
def stopped(model_dir, docs_dir, reference, tmp_path_factory) -> Path:
    """A progress file of a run stopped half-way (made once; tests work on copies)."""
    return partial_progress(model_dir, docs_dir, tmp_path_factory.mktemp("stopped"), reference)


def copy_to(progress: Path, out: Path) -> Path:
    out.mkdir()
    target = out / progress.name
    target.write_bytes(progress.read_bytes())
    return target


def rewrite(path: Path, change) -> None:
    """Change a progress file's content and recompute its checksum, as a file written for other
    settings (or by another program) would be: only the content tells it apart."""
    from scca_eval.evaluation.resume import _checksum

    data = json.loads(path.read_text())
    change(data)
    data["checksum"] = _checksum(data["key"], data["documents"], data["seconds"])
    path.write_text(json.dumps(data))


def bump_first_sum(data):
    data["documents"][0][2] += 1.0


CORRUPTIONS = {
    "truncated": (lambda p: p.write_text(p.read_text()[: len(p.read_text()) // 2]), "not complete JSON"),
    "empty": (lambda p: p.write_text(""), "not complete JSON"),
    "wrong encoding": (lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), "cannot be read"),
    "not a progress file": (lambda p: p.write_text("[1, 2, 3]"), "not a scca-eval progress file"),
    "edited number": (lambda p: _edit_number(p), "checksum"),
    # out of date: the same model's run with other settings (another model's is kept: see models of one name)
    "other settings": (lambda p: rewrite(p, lambda d: d["key"].update(max_tokens=999)), "differing: max_tokens"),
    "other targets": (lambda p: rewrite(p, lambda d: d["key"].update(scored_tokens=7)), "differing: scored_tokens"),
    "wrong token count": (lambda p: rewrite(p, lambda d: d["documents"][0].__setitem__(3, 7)), "scored tokens"),
    "foreign document": (lambda p: rewrite(p, lambda d: d["documents"][0].__setitem__(1, "other.txt")),
                         "is 'other.txt' there"),
    "negative sum": (lambda p: rewrite(p, lambda d: d["documents"][0].__setitem__(2, -1.0)), "impossible NLL"),
    "part-way with all tokens": (lambda p: rewrite(p, _part_way_complete), "saved part-way"),
    "window counts off": (lambda p: rewrite(p, lambda d: d["documents"][0][6].__setitem__(0, 10**6)),
                          "per-window sums"),
}


def _part_way_complete(data):
    """A document marked part-way that claims as many tokens as the whole document has."""
    finished = data["documents"][0]
    data["documents"][0] = finished[:4] + [1]


def _edit_number(path: Path) -> None:
    """Change one saved NLL sum without fixing the checksum (a damaged or hand-edited file)."""
    data = json.loads(path.read_text())
    bump_first_sum(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_untrusted_progress_file_is_reported_and_recomputed(kind, model_dir, docs_dir, reference, stopped,
                                                            tmp_path):
    out = tmp_path / "out"
    progress = copy_to(stopped, out)
    damage, reason = CORRUPTIONS[kind]
    damage(progress)
    notices = []
    record = evaluate(**api_options(model_dir, docs_dir, out), notify=notices.append)[0]
    assert len(notices) == 1 and notices[0].startswith("warning: ignoring the progress file"), notices
    assert reason in notices[0] and "\n" not in notices[0]
    assert record["runtime"]["resumed_documents"] == 0
    same_numbers(record, reference)
    assert not progress.exists()


def test_a_valid_partial_file_is_trusted(model_dir, docs_dir, reference, stopped, tmp_path):
    """Stopped inside a document, the file holds that document's finished windows too (a fifth
    field: how many of its windows the sums cover); the resumed run scores only the rest and
    ends with the uninterrupted run's numbers, bit for bit."""
    out = tmp_path / "out"
    progress = copy_to(stopped, out)
    saved = saved_documents(progress)
    (part_way,) = [entry for entry in json.loads(progress.read_text())["documents"] if entry[4:5] not in ([], [None])]
    assert part_way[4] >= 1 and part_way[3] >= 1
    assert len(part_way[5]) == part_way[4] and sum(part_way[6]) == part_way[3]  # its windows' sums so far
    notices = []
    record = evaluate(**api_options(model_dir, docs_dir, out), notify=notices.append)[0]
    assert notices == [f"resuming ctx 16 · full · docs from {progress}: {saved} of {DOCS} documents are done, "
                       "1 part-way"]
    assert record["runtime"]["resumed_documents"] == saved
    same_numbers(record, reference)


def test_no_resume_starts_over(model_dir, docs_dir, reference, stopped, tmp_path):
    out = tmp_path / "out"
    progress = copy_to(stopped, out)
    rewrite(progress, bump_first_sum)  # a well-formed file, but --no-resume must not read it
    record = evaluate(**api_options(model_dir, docs_dir, out, resume=False), notify=lambda line: None)[0]
    assert record["runtime"]["resumed_documents"] == 0
    same_numbers(record, reference)


def test_finished_cells_of_a_stopped_command_are_not_scored_again(model_dir, docs_dir, tmp_path):
    out = tmp_path / "out"
    options = api_options(model_dir, docs_dir, out)
    options["ctx"] = [16, 32]
    reference = evaluate(**{**options, "out": str(tmp_path / "ref")})
    first_cell_tokens = sum(d["tokens"] for d in reference[0]["documents"])
    with pytest.raises(Interrupted):  # stopped inside the second cell
        evaluate(**options, progress=StopAfter(first_cell_tokens + half(reference[1]), KeyboardInterrupt()))
    assert (out / RECORD).exists() and (out / PROGRESS).exists()  # the first cell's complete progress is kept
    records = evaluate(**options, notify=lambda line: None, progress=StopAfter(10**9, KeyboardInterrupt()))
    assert records[0]["runtime"]["resumed_documents"] == DOCS  # rebuilt from its progress file
    assert 0 < records[1]["runtime"]["resumed_documents"] < DOCS
    for record, expected in zip(records, reference):
        same_numbers(record, expected)
    assert not list(out.glob("*.progress"))


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                   RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")],
                         ids=["torch", "cublas"])
def test_out_of_memory_names_ctx_and_batch_size_and_keeps_progress(model_dir, docs_dir, reference, tmp_path, error):
    out = tmp_path / "out"
    with pytest.raises(UserError) as info:
        evaluate(**api_options(model_dir, docs_dir, out), progress=StopAfter(half(reference), error))
    message = str(info.value)
    assert "\n" not in message
    assert "ctx 16" in message and "batch size 2" in message and "--batch-size 1" in message
    assert "already done are saved" in message
    assert saved_documents(out / PROGRESS) >= 1 and not (out / RECORD).exists()


def test_an_error_other_than_memory_is_raised_as_it_is(model_dir, docs_dir, reference, tmp_path):
    error = RuntimeError("CUDA error: an illegal memory access was encountered")
    with pytest.raises(RuntimeError) as info:
        evaluate(**api_options(model_dir, docs_dir, tmp_path / "out"), progress=StopAfter(half(reference), error))
    assert info.value is error


def test_same_run_twice_gives_the_same_numbers_bit_for_bit(model_dir, docs_dir, reference, tmp_path):
    again = evaluate(**api_options(model_dir, docs_dir, tmp_path), notify=lambda line: None)[0]
    same_numbers(again, reference)
    assert again["runtime"]["deterministic"] is True and reference["runtime"]["deterministic"] is True
    # The sums are real numbers of this model, not a constant: another seed of weights differs.
    assert len({d["nll_sum"] for d in reference["documents"]}) == DOCS


def test_no_write_keeps_no_progress(model_dir, docs_dir, reference, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = api_options(model_dir, docs_dir, None)
    with pytest.raises(Interrupted, match="nothing was saved"):
        evaluate(**options, progress=StopAfter(half(reference), KeyboardInterrupt()))
    assert not list(tmp_path.rglob("*.progress"))


def test_ctrl_c_on_a_short_cell_keeps_its_finished_windows(model_dir, docs_dir, reference, tmp_path):
    """A cell of fewer batches than --save-every (here the default, 32) still keeps at Ctrl-C
    every group of windows it finished, and the run again ends with the same numbers."""
    options = {**api_options(model_dir, docs_dir, tmp_path), "save_every": None}
    with pytest.raises(Interrupted, match="run the same command again"):
        evaluate(**options, progress=StopAfter(half(reference), KeyboardInterrupt()))
    kept = json.loads((tmp_path / PROGRESS).read_text())["documents"]
    # everything scored before the stop is kept but the group in progress (4 batches of 2 windows)
    assert sum(entry[3] for entry in kept) >= half(reference) - 4 * 2 * 15
    (record,) = evaluate(**options, notify=lambda line: None)
    same_numbers(record, reference)


def test_a_stopped_run_keeps_its_progress_when_a_model_of_the_same_name_runs(model_dir, docs_dir, reference,
                                                                              tmp_path):
    """Two models whose folders have one name (run1/final, run2/final) would give their records
    and progress files one name: the later run leaves the stopped run's progress file alone and
    takes a name with a digest of its identity, and the stopped run then continues from its file.
    A run stopped under such a digest name continues from it too."""
    out = tmp_path / "out"
    progress = partial_progress(model_dir, docs_dir, out, reference)
    saved = progress.read_bytes()

    def twin(name):  # another model (another id) whose folder is named as model_dir's
        (tmp_path / name).mkdir()
        link = tmp_path / name / model_dir.name
        link.symlink_to(model_dir.resolve(), target_is_directory=True)
        return link

    said = []
    (other,) = evaluate(**api_options(twin("run2"), docs_dir, out), notify=said.append)
    assert progress.read_bytes() == saved  # the stopped run's progress, untouched
    assert Path(other["path"]).parent == out and Path(other["path"]).name != RECORD
    assert any("stopped run" in line and "differs in the model" in line for line in said), said

    (record,) = evaluate(**api_options(model_dir, docs_dir, out), notify=lambda line: None)
    assert record["path"] == str(out / RECORD) and record["runtime"]["resumed_documents"] >= 1
    same_numbers(record, reference)
    assert not progress.exists()

    third = twin("run3")
    with pytest.raises(Interrupted, match="run the same command again"):
        evaluate(**api_options(third, docs_dir, out), notify=lambda line: None,
                 progress=StopAfter(half(reference), KeyboardInterrupt()))
    (stopped_here,) = [p for p in out.glob("*.progress")]
    (resumed,) = evaluate(**api_options(third, docs_dir, out), notify=lambda line: None)
    assert resumed["path"] + ".progress" == str(stopped_here) and resumed["runtime"]["resumed_documents"] >= 1
    same_numbers(resumed, reference)
    assert json.loads((out / RECORD).read_text())["model"] == str(model_dir)  # the first record, kept
    assert len(list(out.glob("*.json"))) == 3 and not list(out.glob("*.progress"))

    # A run stopped under its digest name continues from it when the plain name is free again.
    fourth = twin("run4")
    with pytest.raises(Interrupted, match="run the same command again"):
        evaluate(**api_options(fourth, docs_dir, out), notify=lambda line: None,
                 progress=StopAfter(half(reference), KeyboardInterrupt()))
    (stopped_here,) = [p for p in out.glob("*.progress")]
    assert stopped_here.name != RECORD + ".progress"
    (out / RECORD).unlink()
    (resumed,) = evaluate(**api_options(fourth, docs_dir, out), notify=lambda line: None)
    assert resumed["path"] + ".progress" == str(stopped_here) and resumed["runtime"]["resumed_documents"] >= 1
    assert not list(out.glob("*.progress"))
