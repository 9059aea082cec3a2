"""One (task, ctx) cell: its windows scored in groups, then its record.

A cell is read from its settings (``settings.py``): its protocol (``protocols.py``) plans the
windows over all documents; a progress file gives back what a stopped run finished; the
rest is scored; the record is made. The windows are scored in
small groups of batches (windows of several documents batched together, a long document cut
between windows). Every ``save_every`` batches of work, every 30 seconds and at Ctrl-C the
per-document sums of the finished groups are saved to a progress file
next to the record (``resume.py``), so a run that is stopped — Ctrl-C, SIGKILL, a lost
machine — continues where it stopped when the same command runs again. Inside a
torch.distributed run each rank scores whole batches of every group and the sums are
added up exactly (``distributed.py``); rank 0 alone writes.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from collections import Counter
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from .. import distributed
from ..data import TokenizedTask
from ..errors import UserError, is_out_of_memory
from ..records import (cell_config, cell_identity, device_name, longlora_record, new_record, progress_key,
                       record_pattern_name, runtime, sweep_key)
from ..records import record_path
from . import cost
from .engine import WindowScores, auto_batch_size, is_compiled, model_device, plan_batches, score_windows
from .metrics import DocScore, summarize
from .protocols import CellPlan
from .resume import DocumentDone, Interrupted, ProgressFile, progress_path, stopped_runs
from .settings import EvalSettings
from .window_sums import encode_windows
from .windows import Window

# Progress is saved after about this many batches of forward work, or after SAVE_SECONDS of
# scoring, whichever comes first, and when the run is interrupted. The windows are scored in
# groups of at most GROUP_BATCHES batches per process: a save (and Ctrl-C) keeps every
# finished group.
DEFAULT_SAVE_EVERY = 32
SAVE_SECONDS = 30.0
GROUP_BATCHES = 4


class Progress(Protocol):
    """What ``evaluate`` reports while it runs (the CLI draws a progress bar)."""

    def begin(self, label: str, total_tokens: int, done_tokens: int = 0) -> None:
        """A cell starts: ``total_tokens`` to score, of which ``done_tokens`` were read back
        from its progress file (done by an earlier run)."""
    def advance(self, tokens: int) -> None: ...
    def end(self) -> None: ...


def cell_label(task: str, pattern: str, ctx: int) -> str:
    """How progress lines name a cell: ctx first, so that a label cut to fit a narrow bar
    still says which cell it is."""
    return f"ctx {ctx} · {pattern} · {task}"


def notify_stderr(message: str) -> None:
    print(f"scca-eval: {message}", file=sys.stderr, flush=True)


def run_cell(lm, tokenizer, model_id, spec, tokenized: TokenizedTask, ctx: int, settings: EvalSettings, *,
             progress=None, ranks=distributed.SINGLE, notify=notify_stderr) -> tuple[dict, ProgressFile | None]:
    """One (task, ctx) cell under the settings' protocol: its record, and its progress file
    (None without ``settings.out``, and for a protocol that reads the documents as one stream)."""
    if settings.protocol.joins_documents:
        return evaluate_longlora_cell(lm, tokenizer, model_id, spec, tokenized, ctx, settings,
                                      progress=progress, ranks=ranks), None
    return evaluate_cell(lm, tokenizer, model_id, spec, tokenized, ctx, settings,
                         progress=progress, ranks=ranks, notify=notify)


def predicted_key(settings: EvalSettings, *, model_part: dict, tokenized: TokenizedTask, spec, ctx: int,
                  dtype: str) -> str:
    """The ``records.config_key`` of the record ``run_cell`` makes for this cell with these
    settings (``model_part``: ``records.model_identity``; ``dtype``: the model's), before it
    runs: what a sweep looks for among the stored records. The protocol's fields come from
    ``cell_fields``, as in the record."""
    fields = settings.protocol.cell_fields(settings, ctx)
    return sweep_key(cell_identity(
        model=model_part, task=tokenized.task.name, data=tokenized.data_fingerprint,
        tokenizer=tokenized.tokenizer_fingerprint, pattern=spec.to_dict(), ctx=ctx, stride=fields.stride,
        protocol=fields.protocol, last_window=fields.last_window, max_tokens=settings.max_tokens,
        add_bos=settings.add_bos, dtype=dtype), fields.bootstrap_seed)


def evaluate_longlora_cell(lm, tokenizer, model_id, spec, tokenized: TokenizedTask, ctx, settings: EvalSettings, *,
                           progress, ranks) -> dict:
    """One cell under LongLoRA's protocol (``protocols.LongLoRAProtocol``): the task's
    documents joined into one stream, as LongLoRA's pre-tokenized .bin files are. It is
    a single computation over the stream, so it keeps no per-document progress."""
    protocol = settings.protocol
    fields = protocol.cell_fields(settings, ctx)
    stream = np.concatenate([d.ids for d in tokenized.docs]) if tokenized.docs else np.zeros(0, np.int32)
    windows = protocol.stream_windows(len(stream), ctx, settings)
    device = model_device(lm)
    batch = settings.batch_size or auto_batch_size(ctx, device, windows)
    total = sum(w.scored for w in windows)
    label = cell_label(tokenized.task.name, record_pattern_name(spec), ctx) + " · longlora"
    if progress is not None:
        progress.begin(label, total)
    started = time.perf_counter()
    began_at = datetime.now(timezone.utc)
    try:
        scores = _score_group(lm, [stream], windows, batch, ranks,
                              progress.advance if progress is not None else None, ctx)
    except _OutOfMemory:
        raise _out_of_memory_error(ctx, batch, lm, None, 0, 1, ranks) from None
    finally:
        if progress is not None:
            progress.end()
    seconds = time.perf_counter() - started
    nll_sum, scored = float(scores.nll_sum.sum()), int(scores.tokens.sum())
    return longlora_record(
        lm, tokenizer, model_id, spec, tokenized, ctx, fields.stride, add_bos=settings.add_bos,
        max_tokens=settings.max_tokens, batch=batch, window_losses=scores.nll_sum / scores.tokens, nll_sum=nll_sum,
        tokens=scored, distinct_tokens=int(min(len(stream) - 1, windows[-1].end - 1)) if windows else 0,
        runtime=runtime(lm, seconds=seconds, tokens_per_second=round(scored / seconds, 1) if seconds > 0 else None,
                        device_text=device_name(device), processes=ranks.world_size, started=began_at,
                        compiled=is_compiled(lm)))


def plan_groups(windows: Sequence[Window], target_tokens: int) -> list[list[int]]:
    """Window indices cut into groups, each closed once it holds at least ``target_tokens``
    tokens of forward work — also inside a long document, whose finished windows are then
    saved part-way. Greedy and in window order, so a run that resumes after the first k
    groups forms the same remaining groups (and adds up the same partial sums)."""
    groups: list[list[int]] = []
    current: list[int] = []
    work = 0
    for index, window in enumerate(windows):
        if current and work >= target_tokens:
            groups.append(current)
            current, work = [], 0
        current.append(index)
        work += window.end - window.start
    if current:
        groups.append(current)
    return groups


def engine_batches(windows: Sequence[Window], batch_size: int) -> list[list[int]]:
    """How the engine cuts ``windows`` into batches (window indices per batch). A rank takes
    whole batches, so every window is computed in the same batch as in a one-process run."""
    return plan_batches(windows, batch_size)


class _OutOfMemory(Exception):
    """Raised on every rank when one of them ran out of memory in a group."""


def _score_group(lm, documents, windows: Sequence[Window], batch: int, ranks, advance, ctx: int) -> WindowScores:
    """Per-window sums of one group; each rank scores its share, the sums are exchanged."""
    mine = distributed.my_batches(engine_batches(windows, batch), ranks)
    nll = np.zeros(len(windows), dtype=np.float64)
    tokens = np.zeros(len(windows), dtype=np.int64)
    out_of_memory = False
    try:
        scores = score_windows(lm, documents, [windows[i] for i in mine], batch_size=batch, progress=advance,
                               window_length=ctx)
        nll[mine] = scores.nll_sum
        tokens[mine] = scores.tokens
    except RuntimeError as error:  # torch.OutOfMemoryError, or a library's failed allocation
        if not is_out_of_memory(error):
            raise
        out_of_memory = True
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    # Every rank must reach the same collectives, so a rank that failed says so first.
    if not distributed.all_agree(not out_of_memory, ranks):
        raise _OutOfMemory
    return WindowScores(distributed.sum_over_ranks(nll, ranks), distributed.sum_over_ranks(tokens, ranks))


class _ScaledAdvance:
    """Rank 0's progress bar for the whole run: rank 0 sees only its own batches, so its
    counts are scaled to the group, and corrected to the exact total when the group ends."""

    def __init__(self, progress: Progress | None, group_total: int, own_total: int):
        self.progress, self.group_total, self.shown = progress, group_total, 0
        self.scale = group_total / own_total if own_total else 0.0
        self.own = 0

    def __call__(self, tokens: int) -> None:
        if self.progress is None:
            return
        self.own += tokens
        target = min(self.group_total, int(self.own * self.scale))
        if target > self.shown:
            self.progress.advance(target - self.shown)
            self.shown = target

    def finish(self) -> None:
        if self.progress is not None and self.group_total > self.shown:
            self.progress.advance(self.group_total - self.shown)
            self.shown = self.group_total


def evaluate_cell(lm, tokenizer, model_id, spec, tokenized: TokenizedTask, ctx: int, settings: EvalSettings, *,
                  progress=None, ranks=distributed.SINGLE, notify=notify_stderr) -> tuple[dict, ProgressFile | None]:
    """Score one (task, ctx) cell of a per-document protocol: plan, resume, score, record.
    Returns its record and its progress file (None without ``settings.out``)."""
    plan = settings.protocol.plan(tokenized, tokenizer, ctx, settings)
    batch = settings.batch_size or auto_batch_size(ctx, model_device(lm), plan.windows)
    cell = _Cell(lm, plan, ctx, batch, settings, ranks)
    if not cell.expected:
        raise UserError(f"task {tokenized.task.name}: no document has two or more tokens to score")
    record = _per_document_record(lm, tokenizer, model_id, spec, tokenized, cell)
    cell.label = cell_label(tokenized.task.name, record["pattern"], ctx)
    if settings.max_tokens is not None and ranks.is_main:
        say_budget_coverage(cell.label, [len(d.ids) for d in plan.documents], plan.lengths,
                            settings.protocol.window_span(ctx), settings.max_tokens, notify)
    _resume(cell, record, notify)
    seconds, scored_now, began_at = _score(cell, model_id, record["pattern"], progress, notify)
    _add_scores(record, cell)
    device_text = device_name(model_device(lm))
    if ranks.is_main and not ranks.is_distributed:
        cost.remember_rate(device_text, model_id, record["pattern"], ctx,
                           scored_now / seconds if seconds > 0 and scored_now else None)
    if ranks.is_distributed:
        device_text += f" × {ranks.world_size} processes ({ranks.backend})"
    record["runtime"] = runtime(
        lm, seconds=cell.seconds_before + seconds,
        tokens_per_second=round(scored_now / seconds, 1) if seconds > 0 and scored_now else None,
        device_text=device_text, processes=ranks.world_size, started=began_at, resumed_documents=cell.resumed,
        compiled=is_compiled(lm))
    return record, cell.progress_file


class _Cell:
    """A per-document cell while it runs: its plan and batch size, and what is done so far
    (read back from its progress file, then added to group by group)."""

    def __init__(self, lm, plan: CellPlan, ctx: int, batch: int, settings: EvalSettings, ranks):
        self.lm, self.plan, self.ctx, self.batch, self.settings, self.ranks = lm, plan, ctx, batch, settings, ranks
        # per scored document: (id, targets to score)
        self.expected = {i: (doc.id, length - 1)
                         for i, (doc, length) in enumerate(zip(plan.documents, plan.lengths)) if length >= 2}
        self.total = sum(count for _, count in self.expected.values())
        self.label = ""
        self.progress_file: ProgressFile | None = None
        self.done: dict[int, DocumentDone] = {}
        self.seconds_before = 0.0  # scoring time of the runs that wrote the progress file
        self.resumed = 0  # documents finished by those runs


def _per_document_record(lm, tokenizer, model_id, spec, tokenized: TokenizedTask, cell: _Cell) -> dict:
    """The record's skeleton: its identity and settings; metrics and runtime come later."""
    settings = cell.settings
    fields = settings.protocol.cell_fields(settings, cell.ctx)
    return new_record(model_id, spec, tokenized, cell.ctx, fields.stride, {
        "protocol": fields.protocol,
        "last_window": fields.last_window,
        **cell.plan.config,
        **cell_config(lm, tokenizer, spec, tokenized, add_bos=settings.add_bos, max_tokens=settings.max_tokens,
                      batch=cell.batch),
        "device_map": settings.device_map,
        "bootstrap_seed": fields.bootstrap_seed,
    })


def _resume(cell: _Cell, record: dict, notify) -> None:
    """Open the cell's progress file (next to its record) and read back what a stopped run finished."""
    settings, ranks = cell.settings, cell.ranks
    if settings.out is None:
        return
    # The name its record will have; one that a stopped run of another model keeps is left to it.
    named = record_path(record, settings.out, notify if ranks.is_main else None,
                        stopped=stopped_runs(settings.out))
    cell.progress_file = ProgressFile(progress_path(named), progress_key(record, cell.total), cell.expected,
                                      lambda message: notify(f"warning: {message}"))
    done: dict[int, DocumentDone] = {}
    if settings.resume and ranks.is_main:
        done = cell.progress_file.load()
        cell.seconds_before = cell.progress_file.loaded_seconds
    cell.done = distributed.share_from_main(done, ranks)
    cell.resumed = _finished(cell.done)
    part_way = len(cell.done) - cell.resumed
    if cell.done and ranks.is_main:
        notify(f"resuming {cell.label} from {cell.progress_file.path}: {cell.resumed} of {len(cell.expected)} "
               "documents are done" + (f", {part_way} part-way" if part_way else ""))


def _score(cell: _Cell, model_id: str, pattern: str, progress, notify) -> tuple[float, int, datetime]:
    """Score the windows not done yet, group by group, saving progress as it goes; return the
    seconds it took, the targets scored and when it began."""
    lm, plan, ctx, batch, ranks, done = cell.lm, cell.plan, cell.ctx, cell.batch, cell.ranks, cell.done
    progress_file = cell.progress_file
    saved = _finished(done)  # finished documents in the progress file as it is on disk
    saved_part_way = len(done) - saved
    todo = _windows_to_do(plan.windows, done)
    windows_per_doc = Counter(w.doc for w in plan.windows)
    save_batches = cell.settings.save_every or DEFAULT_SAVE_EVERY
    groups = plan_groups(todo, min(save_batches, GROUP_BATCHES) * ranks.world_size * batch * ctx)
    device = model_device(lm)
    if ranks.is_main:  # the size and cost of the cell, before a long one starts
        rate = cost.remembered_rate(device_name(device), model_id, pattern, ctx)
        line = cost.estimate_line(cell.label, sum(w.scored for w in todo), len(todo), len({w.doc for w in todo}),
                                  rate=rate, on_cpu=device.type == "cpu")
        if line:
            notify(line)
    if progress is not None:
        progress.begin(cell.label, cell.total, sum(d.tokens for d in done.values()))
    documents = [d.ids for d in plan.documents]
    scored_now = 0  # targets scored by this run (not read from the progress file)
    started = time.perf_counter()
    began_at = datetime.now(timezone.utc)
    unsaved_work, last_save = 0, time.perf_counter()

    def save_progress():
        nonlocal saved, saved_part_way, unsaved_work, last_save
        progress_file.save(done.values(), cell.seconds_before + time.perf_counter() - started)
        saved, saved_part_way = _finished(done), len(done) - _finished(done)
        unsaved_work, last_save = 0, time.perf_counter()

    try:
        for number, group in enumerate(groups, 1):
            group_windows = [todo[i] for i in group]
            group_total = sum(w.end - w.score_from for w in group_windows)
            own = distributed.my_batches(engine_batches(group_windows, batch), ranks)
            advance = _ScaledAdvance(progress, group_total, sum(group_windows[i].scored for i in own))
            scores = _score_group(lm, documents, group_windows, batch, ranks, advance, ctx)
            advance.finish()
            scored_now += group_total
            _add_group(done, scores, group_windows, plan.documents, windows_per_doc)
            unsaved_work += sum(w.end - w.start for w in group_windows)
            if progress_file is not None and ranks.is_main and (
                    number == len(groups) or unsaved_work >= save_batches * batch * ctx
                    or time.perf_counter() - last_save >= SAVE_SECONDS):
                save_progress()
    except _OutOfMemory:
        raise _out_of_memory_error(ctx, batch, lm, progress_file, saved, len(cell.expected), ranks) from None
    except KeyboardInterrupt:
        if progress_file is not None and ranks.is_main and unsaved_work:
            save_progress()  # every finished group is kept
        raise Interrupted(_interrupted_message(progress_file, saved, len(cell.expected), cell.label,
                                               saved_part_way)) from None
    finally:
        if progress is not None:
            progress.end()
    seconds = time.perf_counter() - started
    if progress_file is not None and ranks.is_main and not groups:
        progress_file.save(done.values(), cell.seconds_before)  # nothing left to score: the file is complete
    return seconds, scored_now, began_at


def _add_scores(record: dict, cell: _Cell) -> None:
    """The record's metrics and documents (with their windows' sums where every window's are kept)."""
    plan, done = cell.plan, cell.done
    doc_scores = []
    for index, (doc, length) in enumerate(zip(plan.documents, plan.lengths)):
        if index not in cell.expected:
            continue
        n_bytes, n_words = doc.prefix_stats(length)
        doc_scores.append(DocScore(doc.id, done[index].nll_sum, done[index].tokens, n_bytes, n_words))
    record["metrics"] = summarize(doc_scores, seed=cell.settings.seed)
    record["documents"] = [
        {"id": d.id, "nll_sum": d.nll_sum, "tokens": d.tokens, "bytes": d.bytes, "words": d.words}
        for d in doc_scores
    ]
    windows_per_doc = Counter(w.doc for w in plan.windows)
    for entry, index in zip(record["documents"], [i for i in range(len(plan.documents)) if i in cell.expected]):
        if len(done[index].window_tokens) == windows_per_doc[index]:  # every window's sums are kept
            entry["windows"] = encode_windows(np.array(done[index].window_nll), np.array(done[index].window_tokens))


def say_budget_coverage(label, full_lengths, lengths, ctx, max_tokens, notify) -> None:
    """--max-tokens shares the budget among the documents in whole windows; when it is too small
    for a window of every document, say so and what budget would cover them all."""
    scorable = [n for n in full_lengths if n >= 2]
    covered = sum(1 for n in lengths if n >= 2)
    if covered < len(scorable):
        need = sum(min(n, ctx) - 1 for n in scorable)
        notify(f"{label}: --max-tokens {max_tokens:,} covers {covered} of {len(scorable)} documents (each gets "
               f"at least one whole window); --max-tokens {need:,} or more covers them all")


def _finished(done: dict[int, DocumentDone]) -> int:
    return sum(d.finished for d in done.values())


def _windows_to_do(windows: Sequence[Window], done: dict[int, DocumentDone]) -> list[Window]:
    """The windows not covered by ``done``: none of a finished document, and a document saved
    part-way after its first ``windows`` windows."""
    todo, seen = [], Counter()
    for window in windows:
        saved = done.get(window.doc)
        seen[window.doc] += 1
        if saved is None or (not saved.finished and seen[window.doc] > saved.windows):
            todo.append(window)
    return todo


def _add_group(done: dict[int, DocumentDone], scores: WindowScores, group_windows: Sequence[Window], docs,
               windows_per_doc: Counter) -> None:
    """Add a scored group's per-document sums to ``done``; a document whose last window is not
    yet scored stays part-way, with the count of its windows done."""
    nll, counts = scores.per_document(group_windows, len(docs))
    of_doc = np.fromiter((w.doc for w in group_windows), dtype=np.int64, count=len(group_windows))
    for doc, count in Counter(w.doc for w in group_windows).items():
        before = done.get(doc)
        windows = count + (before.windows if before is not None else 0)
        nll_sum = float(nll[doc]) + (before.nll_sum if before is not None else 0.0)
        tokens = int(counts[doc]) + (before.tokens if before is not None else 0)
        finished = windows == windows_per_doc[doc]
        mine = of_doc == doc  # this document's windows in this group, in order: kept for compare's test
        done[doc] = DocumentDone(doc, docs[doc].id, nll_sum, tokens, None if finished else windows,
                                 (before.window_nll if before else ()) + tuple(scores.nll_sum[mine].tolist()),
                                 (before.window_tokens if before else ()) + tuple(scores.tokens[mine].tolist()))


def _interrupted_message(progress_file, saved: int, n_docs: int, label: str, part_way: int = 0) -> str:
    if progress_file is None:
        return f"interrupted during {label}; nothing was saved (records are not written with --no-write)"
    if not saved and not part_way:
        return f"interrupted during {label} before its first windows were saved; nothing to resume yet"
    part = f" and the finished windows of {part_way} more" if part_way else ""
    return (f"interrupted: {saved} of {n_docs} documents{part} of {label} are saved in {progress_file.path}; "
            "run the same command again to continue")


def _out_of_memory_error(ctx, batch, lm, progress_file, saved: int, n_docs: int, ranks) -> UserError:
    device = model_device(lm)
    where = f"{device.type} (in one of {ranks.world_size} processes)" if ranks.is_distributed else str(device)
    if batch > 1:
        advice = f"give a smaller --batch-size (e.g. --batch-size {batch // 2})"
    else:
        advice = ("one window does not fit next to the model: use --device-map auto to spread the model over "
                  "several GPUs, --dtype bfloat16, or a smaller --ctx")
    kept = ""
    if progress_file is not None and saved:
        kept = f"; the {saved} of {n_docs} documents already done are saved and will not be scored again"
    error = UserError(f"out of memory on {where} at ctx {ctx} with batch size {batch} "
                      f"({batch} window{'s' if batch > 1 else ''} of up to {ctx} tokens per forward pass): "
                      f"{advice}{kept}")
    error.reported_by_main = not ranks.is_main  # every rank raises it; rank 0 says it
    return error
