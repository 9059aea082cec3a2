"""The Python API: ``evaluate`` runs (task, ctx) cells and returns result records.

The CLI is a thin layer over this module; tests call it directly.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Protocol, Sequence

import torch

from . import __version__
from .data import TokenizedTask, load_task, task_from_data_path, tokenize_task
from .engine import auto_batch_size, model_device, score_windows
from .errors import UserError
from .metrics import DocScore, summarize
from .models import load_model, model_record, trained_length
from .attention.register import apply_pattern
from .patterns.parse import check_against_ctx, resolve_pattern
from .results import write_record
from .windows import limit_scored_tokens, plan_windows

DEFAULT_TASKS = ("pg19_sample", "proof_pile_sample")


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
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def check_ctx_and_stride(ctxs: Sequence[int], stride: int | None) -> None:
    for ctx in ctxs:
        if not isinstance(ctx, int) or ctx < 2:
            raise UserError(f"--ctx must be whole numbers of at least 2 tokens (got {ctx!r})")
        if stride is not None and not 1 <= stride <= ctx:
            raise UserError(f"--stride must be between 1 and ctx ({ctx}); got {stride}")


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
    out: str | None = None,
    chunk_size: int | None = None,
    dilation: int | None = None,
    add_bos: bool = False,
    allow_long_context: bool = False,
    seed: int = 0,
    attention_backend: str = "auto",
    loaded: tuple | None = None,
    progress: Progress | None = None,
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
    out:        folder to write one JSON record per cell into (None: don't write)
    loaded:     an already loaded (model, tokenizer) pair to reuse; the pattern is
                applied to it
    """
    ctxs = [ctx] if isinstance(ctx, int) else list(ctx)
    check_ctx_and_stride(ctxs, stride)
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1 (got {max_tokens})")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
    spec = resolve_pattern(pattern, chunk_size=chunk_size, dilation=dilation)
    for c in ctxs:
        check_against_ctx(spec, c)
    task_specs = resolve_tasks(tasks, data)

    if loaded is None:
        loaded = load_model(model, pattern=spec, dtype=dtype, device=device,
                            attention_backend=attention_backend, **model_options)
    else:  # a model loaded earlier, perhaps under another pattern
        apply_pattern(loaded[0], spec, backend=attention_backend)
    lm, tokenizer = loaded
    limit = trained_length(lm)
    too_long = [c for c in ctxs if c > limit]
    if too_long and not allow_long_context:
        raise UserError(
            f"ctx {max(too_long)} is beyond the model's trained length ({limit} tokens); "
            "use --rope-scaling to extend it, or --allow-long-context to evaluate anyway"
        )

    records = []
    for task_spec in task_specs:
        tokenized = tokenize_task(task_spec, tokenizer, add_bos=add_bos)
        for c in ctxs:
            record = _evaluate_cell(
                lm, tokenizer, model, spec, tokenized, c, stride or c,
                batch_size=batch_size, max_tokens=max_tokens, add_bos=add_bos, seed=seed,
                progress=progress,
            )
            if out is not None:
                record["path"] = str(write_record(record, out))
            records.append(record)
    return records


def _evaluate_cell(lm, tokenizer, model_id, spec, tokenized: TokenizedTask, ctx, stride, *,
                   batch_size, max_tokens, add_bos, seed, progress) -> dict:
    docs = tokenized.docs
    lengths = [len(d.ids) for d in docs]
    if max_tokens is not None:
        lengths = limit_scored_tokens(lengths, ctx, max_tokens)
    windows = plan_windows(lengths, ctx, stride)
    device = model_device(lm)
    batch = batch_size or auto_batch_size(ctx, device)
    total = sum(w.end - w.score_from for w in windows)

    if progress is not None:
        progress.begin(f"{tokenized.task.name} · {spec.name} · ctx {ctx}", total)
    started = time.perf_counter()
    began_at = datetime.now(timezone.utc)
    try:
        scores = score_windows(
            lm, [d.ids for d in docs], windows, batch_size=batch,
            progress=progress.advance if progress is not None else None,
        )
    finally:
        if progress is not None:
            progress.end()
    seconds = time.perf_counter() - started

    nll, counts = scores.per_document(windows, len(docs))
    doc_scores = []
    for doc, length, doc_nll, count in zip(docs, lengths, nll, counts):
        if length < 2:
            continue
        n_bytes, n_words = doc.prefix_stats(length)
        doc_scores.append(DocScore(doc.id, float(doc_nll), int(count), n_bytes, n_words))
    if not doc_scores:
        raise UserError(f"task {tokenized.task.name}: no document has two or more tokens to score")
    metrics = summarize(doc_scores, seed=seed)
    scored = int(counts.sum())
    return {
        "schema": 1,
        "model": model_id,
        "task": tokenized.task.name,
        "pattern": spec.name,
        "ctx": ctx,
        "stride": stride,
        "metrics": metrics,
        "documents": [
            {"id": d.id, "nll_sum": d.nll_sum, "tokens": d.tokens, "bytes": d.bytes, "words": d.words}
            for d in doc_scores
        ],
        "skipped_documents": list(tokenized.skipped),
        "config": {
            "protocol": "stride",
            "model": model_record(lm, tokenizer),
            "pattern": spec.to_dict(),
            "task": tokenized.describe(),
            "data_fingerprint": tokenized.data_fingerprint,
            "tokenizer_fingerprint": tokenized.tokenizer_fingerprint,
            "add_bos": add_bos,
            "max_tokens": max_tokens,
            "batch_size": batch,
            "dtype": str(next(lm.parameters()).dtype).removeprefix("torch."),
            "bootstrap_seed": seed,
            "versions": _package_versions(),
        },
        "runtime": {
            "seconds": round(seconds, 3),
            "tokens_per_second": round(scored / seconds, 1) if seconds > 0 else None,
            "device": _device_name(device),
            "started": began_at.isoformat(timespec="seconds"),
        },
    }
