"""One (task, ctx) cell: its windows scored in groups, then its record.

The windows of the protocol are planned over all documents; they are then scored in
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
from ..errors import UserError
from ..records import (cell_config, device_name, longlora_record, new_record, progress_key, record_pattern_name,
                       runtime)
from ..results import record_filename
from . import cost
from .engine import WindowScores, auto_batch_size, is_compiled, model_device, plan_batches, score_windows
from .metrics import DocScore, summarize
from .resume import DocumentDone, Interrupted, ProgressFile, progress_path
from .window_sums import encode_windows
from .windows import Window, limit_scored_tokens, plan_lm_eval_windows, plan_longlora_windows, plan_windows

# Progress is saved after about this many batches of forward work, or after SAVE_SECONDS of
# scoring, whichever comes first, and when the run is interrupted. The windows are scored in
# groups of at most GROUP_BATCHES batches per process: a save (and Ctrl-C) keeps every
# finished group.
DEFAULT_SAVE_EVERY = 32
SAVE_SECONDS = 30.0
GROUP_BATCHES = 4
LONGLORA_STEP = 256  # LongLoRA's eval.py: a window starts every 256 tokens


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


def evaluate_longlora_cell(lm, tokenizer, model_id, spec, tokenized: TokenizedTask, ctx, step, *,
                           batch_size, max_tokens, add_bos, progress, ranks) -> dict:
    """One cell under LongLoRA's protocol (windows.plan_longlora_windows): the task's
    documents joined into one stream, as LongLoRA's pre-tokenized .bin files are. It is
    a single computation over the stream, so it keeps no per-document progress."""
    stream = np.concatenate([d.ids for d in tokenized.docs]) if tokenized.docs else np.zeros(0, np.int32)
    windows = plan_longlora_windows(len(stream), ctx, step)
    if max_tokens is not None:  # the first windows, enough to score max_tokens targets
        windows = windows[: max(1, -(-max_tokens // (ctx - 1)))]
    device = model_device(lm)
    batch = batch_size or auto_batch_size(ctx, device, windows)
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
        lm, tokenizer, model_id, spec, tokenized, ctx, step, add_bos=add_bos, max_tokens=max_tokens, batch=batch,
        window_losses=scores.nll_sum / scores.tokens, nll_sum=nll_sum, tokens=scored,
        distinct_tokens=int(min(len(stream) - 1, windows[-1].end - 1)) if windows else 0,
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
    except torch.OutOfMemoryError:
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


def scored_tokens(tokenized: TokenizedTask, ctx: int, *, max_tokens, protocol: str) -> int:
    """How many targets a cell scores (before it runs, for the cost of a whole run). lm-eval's
    protocol puts one prefix token in front of each document; LongLoRA's scores a stream."""
    extra = 1 if protocol == "lm-eval" else 0
    lengths = [len(d.ids) + extra for d in tokenized.docs]
    if max_tokens is not None and protocol != "longlora":
        lengths = limit_scored_tokens(lengths, ctx + extra, max_tokens)
    if protocol == "longlora":
        total = sum(lengths)
        return min(total, max_tokens) if max_tokens is not None else total
    return sum(n - 1 for n in lengths if n >= 2)


def evaluate_cell(lm, tokenizer, model_id, spec, tokenized: TokenizedTask, ctx, stride, *,
                   batch_size, max_tokens, add_bos, seed, progress, out=None, save_every=None,
                   resume=True, ranks=distributed.SINGLE, notify=notify_stderr,
                   device_map=None, protocol="stride", last_window="full") -> tuple[dict, ProgressFile | None]:
    """Score one (task, ctx) cell; return its record and its progress file (None without ``out``)."""
    docs = tokenized.docs
    protocol_config: dict = {"protocol": protocol, "last_window": last_window}
    if protocol == "lm-eval":  # lm-eval's prefix token in front; ctx is its max_length
        from .lm_eval_protocol import lm_eval_documents

        docs, protocol_config["lm_eval"] = lm_eval_documents(tokenized, tokenizer)
    window_span = ctx + 1 if protocol == "lm-eval" else ctx  # tokens of a window, its last target included
    lengths = [len(d.ids) for d in docs]
    if max_tokens is not None:
        lengths = limit_scored_tokens(lengths, window_span, max_tokens)
    if protocol == "lm-eval":
        windows = plan_lm_eval_windows(lengths, ctx)
    else:
        windows = plan_windows(lengths, ctx, stride, last_window)
    device = model_device(lm)
    batch = batch_size or auto_batch_size(ctx, device, windows)
    expected = {i: (doc.id, length - 1) for i, (doc, length) in enumerate(zip(docs, lengths)) if length >= 2}
    if not expected:
        raise UserError(f"task {tokenized.task.name}: no document has two or more tokens to score")
    total = sum(count for _, count in expected.values())
    record = new_record(model_id, spec, tokenized, ctx, stride, {
        **protocol_config,
        **cell_config(lm, tokenizer, spec, tokenized, add_bos=add_bos, max_tokens=max_tokens, batch=batch),
        "device_map": device_map,
        "bootstrap_seed": seed,
    })
    label = cell_label(tokenized.task.name, record["pattern"], ctx)
    if max_tokens is not None and ranks.is_main:
        say_budget_coverage(label, [len(d.ids) for d in docs], lengths, window_span, max_tokens, notify)

    progress_file = None
    done: dict[int, DocumentDone] = {}
    seconds_before = 0.0
    if out is not None:
        progress_file = ProgressFile(progress_path(Path(out) / record_filename(record)),
                                     progress_key(record, total), expected,
                                     lambda message: notify(f"warning: {message}"))
        if resume and ranks.is_main:
            done = progress_file.load()
            seconds_before = progress_file.loaded_seconds
        done = distributed.share_from_main(done, ranks)
    resumed = saved = _finished(done)  # saved: finished documents in the progress file as it is on disk
    saved_part_way = len(done) - saved
    if done and ranks.is_main:
        notify(f"resuming {label} from {progress_file.path}: {resumed} of {len(expected)} documents are done"
               + (f", {saved_part_way} part-way" if saved_part_way else ""))

    todo = _windows_to_do(windows, done)
    windows_per_doc = Counter(w.doc for w in windows)
    save_batches = save_every or DEFAULT_SAVE_EVERY
    groups = plan_groups(todo, min(save_batches, GROUP_BATCHES) * ranks.world_size * batch * ctx)
    device_text = device_name(device)
    if ranks.is_main:  # the size and cost of the cell, before a long one starts
        rate = cost.remembered_rate(device_text, model_id, record["pattern"], ctx)
        line = cost.estimate_line(label, sum(w.scored for w in todo), len(todo), len({w.doc for w in todo}),
                                  rate=rate, on_cpu=device.type == "cpu")
        if line:
            notify(line)
    if progress is not None:
        progress.begin(label, total, sum(d.tokens for d in done.values()))
    documents = [d.ids for d in docs]
    scored_now = 0  # targets scored by this run (not read from the progress file)
    started = time.perf_counter()
    began_at = datetime.now(timezone.utc)
    unsaved_work, last_save = 0, time.perf_counter()

    def save_progress():
        nonlocal saved, saved_part_way, unsaved_work, last_save
        progress_file.save(done.values(), seconds_before + time.perf_counter() - started)
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
            _add_group(done, scores, group_windows, docs, windows_per_doc)
            unsaved_work += sum(w.end - w.start for w in group_windows)
            if progress_file is not None and ranks.is_main and (
                    number == len(groups) or unsaved_work >= save_batches * batch * ctx
                    or time.perf_counter() - last_save >= SAVE_SECONDS):
                save_progress()
    except _OutOfMemory:
        raise _out_of_memory_error(ctx, batch, lm, progress_file, saved, len(expected), ranks) from None
    except KeyboardInterrupt:
        if progress_file is not None and ranks.is_main and unsaved_work:
            save_progress()  # every finished group is kept
        raise Interrupted(_interrupted_message(progress_file, saved, len(expected), label, saved_part_way)) from None
    finally:
        if progress is not None:
            progress.end()
    seconds = time.perf_counter() - started
    if progress_file is not None and ranks.is_main and not groups:
        progress_file.save(done.values(), seconds_before)  # nothing left to score: the file is complete

    doc_scores = []
    for index, (doc, length) in enumerate(zip(docs, lengths)):
        if index not in expected:
            continue
        n_bytes, n_words = doc.prefix_stats(length)
        saved = done[index]
        doc_scores.append(DocScore(doc.id, saved.nll_sum, saved.tokens, n_bytes, n_words))
    record["metrics"] = summarize(doc_scores, seed=seed)
    record["documents"] = [
        {"id": d.id, "nll_sum": d.nll_sum, "tokens": d.tokens, "bytes": d.bytes, "words": d.words}
        for d in doc_scores
    ]
    for entry, index in zip(record["documents"], [i for i in range(len(docs)) if i in expected]):
        if len(done[index].window_tokens) == windows_per_doc[index]:  # every window's sums are kept
            entry["windows"] = encode_windows(np.array(done[index].window_nll), np.array(done[index].window_tokens))
    if ranks.is_main and not ranks.is_distributed:
        cost.remember_rate(device_text, model_id, record["pattern"], ctx,
                           scored_now / seconds if seconds > 0 and scored_now else None)
    if ranks.is_distributed:
        device_text += f" × {ranks.world_size} processes ({ranks.backend})"
    record["runtime"] = runtime(
        lm, seconds=seconds_before + seconds,
        tokens_per_second=round(scored_now / seconds, 1) if seconds > 0 and scored_now else None,
        device_text=device_text, processes=ranks.world_size, started=began_at, resumed_documents=resumed,
        compiled=is_compiled(lm))
    return record, progress_file


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
