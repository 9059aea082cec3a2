"""The Python API: ``evaluate`` runs (task, ctx) cells and returns result records.

The CLI is a thin layer over this module; tests call it directly.

How a cell runs (``_evaluate_cell``): the windows of the protocol are planned over all
documents; the documents are then scored in groups of about ``save_every`` batches of
work (whole documents, windows of several documents batched together). After each group
the per-document sums are saved to a progress file next to the record (``resume.py``), so
a run that is stopped — Ctrl-C, SIGKILL, a lost machine — continues where it stopped when
the same command runs again. Inside a torch.distributed run each rank scores whole
batches of every group and the sums are added up exactly (``distributed.py``); rank 0
alone writes.
"""

from __future__ import annotations

import hashlib
import platform
import sys
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
import torch

from . import __version__
from . import distributed
from .attention.register import apply_pattern
from .data import TokenizedTask, load_task, task_from_data_path, tokenize_task
from .engine import (WindowScores, auto_batch_size, compile_for_evaluation, is_compiled, model_device,
                     score_windows)
from .errors import UserError
from .metrics import DocScore, summarize
from .models import load_model, model_record, trained_length
from .models.rope import beyond_length_message
from .patterns.parse import check_against_ctx, resolve_pattern
from .patterns.spec import PatternSpec
from .results import record_filename, write_record
from .resume import DocumentDone, Interrupted, ProgressFile, progress_path
from .windows import Window, limit_scored_tokens, longlora_perplexity, plan_longlora_windows, plan_windows

DEFAULT_TASKS = ("pg19_sample", "proof_pile_sample")
# Progress is saved after about this many batches of forward work (whole documents).
DEFAULT_SAVE_EVERY = 32
# The longest beyond-RoPE ctx each model was warned about (ppl runs one evaluate per pattern).
_LONG_CONTEXT_WARNED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class Progress(Protocol):
    """What ``evaluate`` reports while it runs (the CLI draws a progress bar)."""

    def begin(self, label: str, total_tokens: int) -> None: ...
    def advance(self, tokens: int) -> None: ...
    def end(self) -> None: ...


@dataclass
class Cell:
    """One (task, ctx) evaluation: the unit of a result record."""

    task: TokenizedTask
    ctx: int
    stride: int


def _package_versions() -> dict:
    import transformers

    return {
        "scca_eval": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"cpu ({platform.processor() or platform.machine()}, {threads} thread{'s' if threads > 1 else ''})"


def _notify_stderr(message: str) -> None:
    print(f"scca-eval: {message}", file=sys.stderr, flush=True)


def record_pattern_name(spec: PatternSpec) -> str:
    """The ``pattern`` of a record (and of its file name): the preset name, or for a custom mix
    ``custom-`` and 8 hex digits of the sha256 of its canonical text (``spec.canonical()``,
    e.g. ``1/2 local + 1/2 cross(1)``), so two different mixes never share a record file,
    and the same mix written two ways (``0.5 local`` / ``1/2 local``, text or YAML list)
    gets the same name. Chunk size and dilation are not part of the name, as for presets;
    the record's ``config.pattern`` holds every setting."""
    if spec.name != "custom":
        return spec.name
    return "custom-" + hashlib.sha256(spec.canonical().encode("utf-8")).hexdigest()[:8]


def determinism(model: torch.nn.Module) -> tuple[bool, str]:
    """Whether running the same cell again on this device gives the same float64 sums bit for
    bit, and why. CPU kernels sum in a fixed order for a given number of threads (tested);
    on a GPU, matrix-product and attention kernels are chosen per shape and may split their
    sums differently from run to run, so a GPU run is not claimed to be bitwise repeatable."""
    device = model_device(model)
    attention = getattr(model.config, "_attn_implementation", None) or "unknown"
    if device.type == "cpu":
        return True, (f"CPU run with {torch.get_num_threads()} threads: kernels sum in a fixed order, so the "
                      f"same run gives the same numbers bit for bit (attention: {attention})")
    flag = torch.are_deterministic_algorithms_enabled()
    return False, (f"{device.type} run: cuBLAS matrix products and the attention kernels ({attention}) may "
                   "choose different algorithms or summation orders from run to run, and the per-window sums "
                   "are accumulated with atomic adds, so repeated runs can differ in the last bits; "
                   f"torch.are_deterministic_algorithms_enabled() was {str(flag).lower()}")


def check_ctx_and_stride(ctxs: Sequence[int], stride: int | None) -> None:
    for ctx in ctxs:
        if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2:
            raise UserError(f"--ctx must be whole numbers of at least 2 tokens (got {ctx!r})")
        if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int)
                                   or not 1 <= stride <= ctx):
            raise UserError(f"--stride must be between 1 and ctx ({ctx}); got {stride!r}")


def check_run_options(*, batch_size=None, max_tokens=None, save_every=None) -> None:
    """The numeric options of a run that must be whole numbers of at least 1."""
    for option, value in (("--batch-size", batch_size), ("--max-tokens", max_tokens),
                          ("--save-every", save_every)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"{option} must be a whole number of at least 1 (got {value!r})")


def check_out_folder(out) -> None:
    """``--out`` must be a folder (or not exist yet, to be made)."""
    if out is None:
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; give a folder for the result records")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out {out}: {parent} is a file, not a folder; give a folder for the result records")
            break


def resolve_tasks(tasks: Iterable[str] | None, data: Iterable[str] | None):
    """TaskSpecs from task names/YAML paths and --data paths (default: the sample tasks)."""
    tasks = list(tasks or [])
    data = list(data or [])
    if not tasks and not data:
        tasks = list(DEFAULT_TASKS)
    return [load_task(name) for name in tasks] + [task_from_data_path(path) for path in data]


def evaluate(
    model: str = "default",
    tasks: Iterable[str] | None = None,
    ctx: int | Sequence[int] = 1024,
    stride: int | None = None,
    pattern: str = "full",
    *,
    data: Iterable[str] | None = None,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    device_map: str | None = None,
    out: str | None = None,
    chunk_size: int | None = None,
    dilation: int | None = None,
    add_bos: bool = False,
    allow_long_context: bool = False,
    seed: int = 0,
    attention_backend: str = "auto",
    protocol: str = "stride",
    compile: bool = False,
    save_every: int | None = None,
    resume: bool = True,
    keep_progress: bool = False,
    loaded: tuple | None = None,
    progress: Progress | None = None,
    notify: Callable[[str], None] | None = None,
    **model_options,
) -> list[dict]:
    """Evaluate ``model`` on every (task, ctx) cell; return one record per cell.

    model:      "default" (embedded SmolLM2-135M), a model folder, a .gguf file or a hub id
    tasks:      task names or YAML paths (default: pg19_sample and proof_pile_sample)
    data:       local files or folders evaluated as ad-hoc tasks
    ctx:        window length(s) in tokens
    stride:     tokens a window advances (default: ctx, disjoint windows)
    pattern:    preset name or custom mix (see docs/patterns.md)
    max_tokens: cap on scored tokens per (task, ctx), for quick looks
    device_map: e.g. "auto": spread the model over the available devices (accelerate)
    protocol:   "stride" (default: per document, every token scored once) or "longlora"
                (LongLoRA's eval.py: the documents as one stream, ctx-token windows every
                ``stride`` tokens — default 256 — all their tokens scored, perplexity =
                exp(mean of the window losses)); see docs/protocols.md
    compile:    compile the model's decoder layers and the loss step first
                (``engine.compile_for_evaluation``; numbers change within float noise)
    out:        folder to write one JSON record per cell into (None: don't write, and keep
                no progress)
    save_every: save progress after about this many batches of work (default 32)
    resume:     continue a cell from its progress file when one matches (default True)
    keep_progress: leave the complete progress files of the finished cells for the caller
                to remove with ``resume.remove_progress(records)`` once a larger run is
                done (``ppl`` over several patterns); by default they are removed at the end
    loaded:     an already loaded (model, tokenizer) pair to reuse; the pattern is
                applied to it
    notify:     receives one-line notices: a resumed cell, an untrusted progress file
                (default: printed to stderr)

    Inside an initialized torch.distributed process group the windows are shared among the
    ranks; every rank returns the same records, and only rank 0 writes files.
    """
    ctxs = [ctx] if isinstance(ctx, int) else list(ctx)
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if protocol == "longlora" and stride is not None and stride < 1:
        raise UserError(f"--stride (the LongLoRA window step) must be at least 1; got {stride}")
    check_ctx_and_stride(ctxs, None if protocol == "longlora" else stride)
    check_run_options(batch_size=batch_size, max_tokens=max_tokens, save_every=save_every)
    check_out_folder(out)
    spec = resolve_pattern(pattern, chunk_size=chunk_size, dilation=dilation)
    for c in ctxs:
        check_against_ctx(spec, c)
    task_specs = resolve_tasks(tasks, data)
    ranks = distributed.current()
    say = (notify or _notify_stderr) if ranks.is_main else (lambda message: None)

    if loaded is None:
        loaded = load_model(model, pattern=spec, dtype=dtype, device=device, device_map=device_map,
                            attention_backend=attention_backend, **model_options)
    else:  # a model loaded earlier, perhaps under another pattern
        apply_pattern(loaded[0], spec, backend=attention_backend)
    lm, tokenizer = loaded
    if compile and not is_compiled(lm):
        compile_for_evaluation(lm)
    limit = trained_length(lm)
    too_long = [c for c in ctxs if limit is not None and c > limit]
    if too_long:
        beyond = beyond_length_message(lm, max(too_long))
        if not allow_long_context:
            raise UserError(f"{beyond}, or --allow-long-context evaluates it anyway")
        if _LONG_CONTEXT_WARNED.get(lm) != max(too_long):  # once per model, not once per pattern
            _LONG_CONTEXT_WARNED[lm] = max(too_long)
            say(f"warning: {beyond}; evaluating as it is (--allow-long-context)")

    records, finished_progress = [], []
    for task_spec in task_specs:
        tokenized = tokenize_task(task_spec, tokenizer, add_bos=add_bos)
        for c in ctxs:
            if protocol == "longlora":
                record = _evaluate_longlora_cell(
                    lm, tokenizer, model, spec, tokenized, c, stride or LONGLORA_STEP,
                    batch_size=batch_size, max_tokens=max_tokens, add_bos=add_bos,
                    progress=progress if ranks.is_main else None, ranks=ranks,
                )
                if out is not None and ranks.is_main:
                    record["path"] = str(write_record(record, out))
                records.append(record)
                continue
            record, progress_file = _evaluate_cell(
                lm, tokenizer, model, spec, tokenized, c, stride or c,
                batch_size=batch_size, max_tokens=max_tokens, add_bos=add_bos, seed=seed,
                progress=progress if ranks.is_main else None, out=out, save_every=save_every,
                resume=resume, ranks=ranks, notify=say, device_map=device_map,
            )
            if out is not None and ranks.is_main:
                record["path"] = str(write_record(record, out))
            if progress_file is not None and ranks.is_main:
                finished_progress.append(progress_file)
            records.append(record)
    # A finished cell keeps its (complete) progress file until every cell of the call is done,
    # so that running an interrupted multi-cell command again rebuilds the finished cells
    # from it instead of scoring them again.
    if not keep_progress:
        for progress_file in finished_progress:
            progress_file.remove()
    return records


# ---------------------------------------------------------------- one cell

def _cell_config(lm, tokenizer, spec, tokenized: TokenizedTask, *, add_bos, max_tokens, batch) -> dict:
    """The settings every record stores, whatever its protocol."""
    return {
        "model": model_record(lm, tokenizer),
        "pattern": spec.to_dict(),
        "task": tokenized.describe(),
        "data_fingerprint": tokenized.data_fingerprint,
        "tokenizer_fingerprint": tokenized.tokenizer_fingerprint,
        "add_bos": add_bos,
        "max_tokens": max_tokens,
        "batch_size": batch,
        "dtype": str(next(lm.parameters()).dtype).removeprefix("torch."),
        "versions": _package_versions(),
    }


PROTOCOLS = ("stride", "longlora")
LONGLORA_STEP = 256  # LongLoRA's eval.py: a window starts every 256 tokens


def _evaluate_longlora_cell(lm, tokenizer, model_id, spec, tokenized: TokenizedTask, ctx, step, *,
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
    label = f"{tokenized.task.name} · {record_pattern_name(spec)} · ctx {ctx} · longlora"
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
    window_losses = scores.nll_sum / scores.tokens
    nll_sum, scored = float(scores.nll_sum.sum()), int(scores.tokens.sum())
    deterministic, determinism_note = determinism(lm)
    return {
        "schema": 1,
        "model": model_id,
        "task": tokenized.task.name,
        "pattern": record_pattern_name(spec),
        "ctx": ctx,
        "stride": step,
        "metrics": {
            "perplexity": longlora_perplexity(window_losses),
            "perplexity_batched_as_published": longlora_perplexity(window_losses, batch_size=batch),
            "nll_sum": nll_sum,
            "tokens": scored,
            "distinct_tokens_scored": int(min(len(stream) - 1, windows[-1].end - 1)) if windows else 0,
            "windows": len(windows),
            "mean_nll": float(np.mean(window_losses)),
            "bits_per_byte": None,
            "byte_perplexity": None,
            "word_perplexity": None,
            "ci95": None,
        },
        "documents": [{"id": "stream", "nll_sum": nll_sum, "tokens": scored, "bytes": None, "words": None}],
        "skipped_documents": list(tokenized.skipped),
        "config": {
            "protocol": "longlora",
            "longlora_step": step,
            **_cell_config(lm, tokenizer, spec, tokenized, add_bos=add_bos, max_tokens=max_tokens, batch=batch),
        },
        "runtime": {
            "seconds": round(seconds, 3),
            "tokens_per_second": round(scored / seconds, 1) if seconds > 0 else None,
            "device": _device_name(device),
            "processes": ranks.world_size,
            "started": began_at.isoformat(timespec="seconds"),
            "deterministic": deterministic,
            "determinism_note": determinism_note,
            "compiled": is_compiled(lm),
        },
    }


def _plan_groups(windows: Sequence[Window], target_tokens: int) -> list[list[int]]:
    """Window indices cut into groups of whole documents, each closed once it holds at least
    ``target_tokens`` tokens of forward work. Greedy and in document order, so a run that
    resumes after the first k groups forms the same remaining groups."""
    groups: list[list[int]] = []
    current: list[int] = []
    work = 0
    for index, window in enumerate(windows):
        if current and window.doc != windows[current[-1]].doc and work >= target_tokens:
            groups.append(current)
            current, work = [], 0
        current.append(index)
        work += window.end - window.start
    if current:
        groups.append(current)
    return groups


def _engine_batches(windows: Sequence[Window], batch_size: int) -> list[list[int]]:
    """How the engine cuts ``windows`` into batches (window indices per batch). A rank takes
    whole batches, so every window is computed in the same batch as in a one-process run."""
    from .engine import plan_batches

    return plan_batches(windows, batch_size)


class _OutOfMemory(Exception):
    """Raised on every rank when one of them ran out of memory in a group."""


def _score_group(lm, documents, windows: Sequence[Window], batch: int, ranks, advance, ctx: int) -> WindowScores:
    """Per-window sums of one group; each rank scores its share, the sums are exchanged."""
    mine = distributed.my_batches(_engine_batches(windows, batch), ranks)
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


def _cell_key(record: dict, scored_tokens: int) -> dict:
    """Everything that decides a cell's per-document sums (what a progress file must match)."""
    config = record["config"]
    model_info = config["model"] or {}
    fingerprint = model_info.get("fingerprint")
    return {
        "model": {
            "id": record["model"],
            "weights": fingerprint.get("digest") if isinstance(fingerprint, dict) else None,
            "adapter": model_info.get("adapter"),
            "rope_scaling": model_info.get("rope_scaling"),
        },
        "task": record["task"],
        "data": config["data_fingerprint"],
        "tokenizer": config["tokenizer_fingerprint"],
        "pattern": config["pattern"],
        "ctx": record["ctx"],
        "stride": record["stride"],
        "protocol": config["protocol"],
        "max_tokens": config["max_tokens"],
        "add_bos": config["add_bos"],
        "dtype": config["dtype"],
        "scored_tokens": scored_tokens,
    }


def _evaluate_cell(lm, tokenizer, model_id, spec, tokenized: TokenizedTask, ctx, stride, *,
                   batch_size, max_tokens, add_bos, seed, progress, out=None, save_every=None,
                   resume=True, ranks=distributed.SINGLE, notify=_notify_stderr,
                   device_map=None) -> tuple[dict, ProgressFile | None]:
    """Score one (task, ctx) cell; return its record and its progress file (None without ``out``)."""
    docs = tokenized.docs
    lengths = [len(d.ids) for d in docs]
    if max_tokens is not None:
        lengths = limit_scored_tokens(lengths, ctx, max_tokens)
    windows = plan_windows(lengths, ctx, stride)
    device = model_device(lm)
    batch = batch_size or auto_batch_size(ctx, device, windows)
    expected = {i: (doc.id, length - 1) for i, (doc, length) in enumerate(zip(docs, lengths)) if length >= 2}
    if not expected:
        raise UserError(f"task {tokenized.task.name}: no document has two or more tokens to score")
    total = sum(count for _, count in expected.values())
    deterministic, determinism_note = determinism(lm)

    record = {
        "schema": 1,
        "model": model_id,
        "task": tokenized.task.name,
        "pattern": record_pattern_name(spec),
        "ctx": ctx,
        "stride": stride,
        "metrics": None,
        "documents": None,
        "skipped_documents": list(tokenized.skipped),
        "config": {
            "protocol": "stride",
            **_cell_config(lm, tokenizer, spec, tokenized, add_bos=add_bos, max_tokens=max_tokens, batch=batch),
            "device_map": device_map,
            "bootstrap_seed": seed,
        },
    }
    label = f"{tokenized.task.name} · {record['pattern']} · ctx {ctx}"

    progress_file = None
    done: dict[int, DocumentDone] = {}
    seconds_before = 0.0
    if out is not None:
        progress_file = ProgressFile(progress_path(Path(out) / record_filename(record)),
                                     _cell_key(record, total), expected,
                                     lambda message: notify(f"warning: {message}"))
        if resume and ranks.is_main:
            done = progress_file.load()
            seconds_before = progress_file.loaded_seconds
        done = distributed.share_from_main(done, ranks)
    resumed = saved = len(done)  # saved: documents in the progress file as it is on disk
    if resumed and ranks.is_main:
        notify(f"resuming {label} from {progress_file.path}: {resumed} of {len(expected)} documents are done")

    todo = [w for w in windows if w.doc not in done]
    groups = _plan_groups(todo, (save_every or DEFAULT_SAVE_EVERY) * batch * ctx)
    if progress is not None:
        progress.begin(label, total)
        progress.advance(sum(d.tokens for d in done.values()))
    documents = [d.ids for d in docs]
    scored_now = 0  # targets scored by this run (not read from the progress file)
    started = time.perf_counter()
    began_at = datetime.now(timezone.utc)
    try:
        for group in groups:
            group_windows = [todo[i] for i in group]
            group_total = sum(w.end - w.score_from for w in group_windows)
            own = distributed.my_batches(_engine_batches(group_windows, batch), ranks)
            advance = _ScaledAdvance(progress, group_total, sum(group_windows[i].scored for i in own))
            scores = _score_group(lm, documents, group_windows, batch, ranks, advance, ctx)
            advance.finish()
            scored_now += group_total
            nll, counts = scores.per_document(group_windows, len(docs))
            for doc in dict.fromkeys(w.doc for w in group_windows):
                done[doc] = DocumentDone(doc, docs[doc].id, float(nll[doc]), int(counts[doc]))
            if progress_file is not None and ranks.is_main:
                progress_file.save(done.values(), seconds_before + time.perf_counter() - started)
                saved = len(done)
    except _OutOfMemory:
        raise _out_of_memory_error(ctx, batch, lm, progress_file, saved, len(expected), ranks) from None
    except KeyboardInterrupt:
        raise Interrupted(_interrupted_message(progress_file, saved, len(expected), label)) from None
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
    device_text = _device_name(device)
    if ranks.is_distributed:
        device_text += f" × {ranks.world_size} processes ({ranks.backend})"
    total_seconds = seconds_before + seconds
    record["runtime"] = {
        "seconds": round(total_seconds, 3),
        "tokens_per_second": round(scored_now / seconds, 1) if seconds > 0 and scored_now else None,
        "device": device_text,
        "processes": ranks.world_size,
        "started": began_at.isoformat(timespec="seconds"),
        "resumed_documents": resumed,
        "deterministic": deterministic,
        "determinism_note": determinism_note,
        "compiled": is_compiled(lm),
    }
    return record, progress_file


def _interrupted_message(progress_file, saved: int, n_docs: int, label: str) -> str:
    if progress_file is None:
        return f"interrupted during {label}; nothing was saved (records are not written with --no-write)"
    if not saved:
        return f"interrupted during {label} before its first documents were done; nothing to resume yet"
    return (f"interrupted: {saved} of {n_docs} documents of {label} are saved in {progress_file.path}; "
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
