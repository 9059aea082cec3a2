"""The Python API: ``evaluate`` runs (task, ctx) cells and returns result records.

The CLI is a thin layer over this module; tests call it directly. ``evaluate`` checks
its settings (``validation.py``), loads the model with its pattern (``models``; a model
handed in is left as it is when it already carries the pattern), tokenizes each task
once (``data``) and runs each cell (``evaluation/cells.py``), which builds the records
(``records.py``) and writes them (``results.py``).
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

from . import distributed
from .attention.register import apply_pattern
from .evaluation.cells import (DEFAULT_SAVE_EVERY, LONGLORA_STEP, Progress, evaluate_cell,
                    evaluate_longlora_cell, notify_stderr)
from .choices import PROTOCOLS
from .data import tokenize_task
from .evaluation.engine import compile_for_evaluation, is_compiled
from .models import load_model
from .records import determinism, record_pattern_name
from .results import write_record
from .validation import (DEFAULT_TASKS, check_ctx_and_stride, check_out_folder,
                         check_protocol, check_run_options, check_trained_length, resolve_patterns,
                         resolve_tasks, warn_if_not_evaluation)

# The API, and names the CLI, the sweep and older callers take from here.
__all__ = ["DEFAULT_SAVE_EVERY", "DEFAULT_TASKS", "LONGLORA_STEP", "PROTOCOLS", "Progress", "check_ctx_and_stride",
           "check_out_folder", "check_run_options", "determinism", "evaluate", "record_pattern_name", "resolve_tasks"]


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
    last_window: str = "full",
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
                exp(mean of the window losses)) or "lm-eval" (lm-evaluation-harness's
                loglikelihood_rolling, ctx = its max_length); see docs/protocols.md
    last_window: "full" (default: a document's last window ends at its end and is ctx
                long) or "short" (only the tokens left, as the transformers/YaRN recipes)
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
    check_protocol(protocol, ctxs, stride, last_window=last_window, add_bos=add_bos)
    check_run_options(batch_size=batch_size, max_tokens=max_tokens, save_every=save_every)
    check_out_folder(out)
    (spec,) = resolve_patterns([pattern], ctxs, chunk_size=chunk_size, dilation=dilation)
    task_specs = resolve_tasks(tasks, data)
    ranks = distributed.current()
    say = (notify or notify_stderr) if ranks.is_main else (lambda message: None)
    warn_if_not_evaluation(task_specs, say)

    if loaded is None:
        loaded = load_model(model, pattern=spec, dtype=dtype, device=device, device_map=device_map,
                            attention_backend=attention_backend, **model_options)
    else:  # a model loaded earlier: left as it is when it already carries this pattern
        apply_pattern(loaded[0], spec, backend=attention_backend)
    lm, tokenizer = loaded
    if compile and not is_compiled(lm):
        compile_for_evaluation(lm)
    check_trained_length(lm, ctxs, allow_long_context, say)

    records, finished_progress = [], []
    for task_spec in task_specs:
        tokenized = tokenize_task(task_spec, tokenizer, add_bos=add_bos)
        for c in ctxs:
            if protocol == "longlora":
                record = evaluate_longlora_cell(
                    lm, tokenizer, model, spec, tokenized, c, stride or LONGLORA_STEP,
                    batch_size=batch_size, max_tokens=max_tokens, add_bos=add_bos,
                    progress=progress if ranks.is_main else None, ranks=ranks,
                )
                if out is not None and ranks.is_main:
                    record["path"] = str(write_record(record, out, say))
                records.append(record)
                continue
            record, progress_file = evaluate_cell(
                lm, tokenizer, model, spec, tokenized, c, stride or c,
                batch_size=batch_size, max_tokens=max_tokens, add_bos=add_bos, seed=seed,
                progress=progress if ranks.is_main else None, out=out, save_every=save_every,
                resume=resume, ranks=ranks, notify=say, device_map=device_map, protocol=protocol,
                last_window=last_window,
            )
            if out is not None and ranks.is_main:
                record["path"] = str(write_record(record, out, say))
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


def run_cost_line(model_id: str, loaded, specs, *, tasks=None, data=None, ctx, max_tokens=None,
                  protocol: str = "stride", add_bos: bool = False) -> str | None:
    """The line said before the first cell of a run of several cells: how many, how many tokens
    to score in all, and how long that takes at the rates earlier runs reached on this device."""
    from .evaluation import cost
    from .evaluation.cells import scored_tokens
    from .evaluation.engine import model_device
    from .records import device_name, record_pattern_name

    lm, tokenizer = loaded
    device = model_device(lm)
    device_text = device_name(device)
    cells = []
    for task_spec in resolve_tasks(tasks, data):
        tokenized = tokenize_task(task_spec, tokenizer, add_bos=add_bos)
        for c in ctx:
            tokens = scored_tokens(tokenized, c, max_tokens=max_tokens, protocol=protocol)
            cells += [(tokens, cost.remembered_rate(device_text, model_id, record_pattern_name(spec), c))
                      for spec in specs]
    return cost.run_line(cells, on_cpu=device.type == "cpu")
