"""The Python API: ``evaluate`` runs (task, ctx) cells and returns result records.

The CLI is a thin layer over this module; tests call it directly. ``evaluate`` takes the
settings as one object (``evaluation/settings.py``: ``EvalSettings``, or keywords that build
one), checks them once, loads the model with its pattern (``models``; a model handed in is
left as it is when it already carries the pattern), tokenizes each task (``data``) and runs
each cell (``evaluation/cells.py``), which builds the records (``records/build.py``); they
are written here (``records/store.py``).
"""

from __future__ import annotations

import math
from typing import Callable

from . import distributed
from .attention.register import apply_pattern
from .choices import PROTOCOLS
from .data import tokenize_task
from .evaluation.cells import DEFAULT_SAVE_EVERY, Progress, notify_stderr, run_cell
from .evaluation.engine import compile_for_evaluation, is_compiled
from .evaluation.protocols import LONGLORA_STEP
from .evaluation.resume import stopped_runs
from .evaluation.settings import EvalSettings
from .models import load_model
from .records import determinism, record_pattern_name
from .records import write_record
from .validation import (DEFAULT_TASKS, check_ctx_and_stride, check_out_folder, check_run_options,
                         check_trained_length, resolve_tasks, warn_if_not_evaluation)

# The API, and names the CLI, the sweep and older callers take from here.
__all__ = ["DEFAULT_SAVE_EVERY", "DEFAULT_TASKS", "EvalSettings", "LONGLORA_STEP", "PROTOCOLS", "Progress",
           "check_ctx_and_stride", "check_out_folder", "check_run_options", "determinism", "evaluate",
           "record_pattern_name", "resolve_tasks"]


def evaluate(
    model: str = "default",
    settings: EvalSettings | None = None,
    *,
    loaded: tuple | None = None,
    progress: Progress | None = None,
    notify: Callable[[str], None] | None = None,
    keep_progress: bool = False,
    **options,
) -> list[dict]:
    """Evaluate ``model`` on every (pattern, task, ctx) cell of ``settings``; return one record per cell.

    model:      "default" (embedded SmolLM2-135M), a model folder, a .gguf file or a hub id
    settings:   an ``EvalSettings`` (``scca_eval.evaluation.settings``: tasks, data, ctx,
                patterns, protocol, stride, last_window, max_tokens, out, ...; its fields say
                what each does). Instead of one, its fields may be given as keywords here
                (``pattern=`` for a single pattern): ``evaluate("default", ctx=[1024, 2048],
                pattern="s2", max_tokens=16384)`` builds ``EvalSettings.from_options`` of them.
    options:    the other keywords go to ``load_model`` when the model is loaded here (adapter,
                rope_scaling, tokenizer, ...)
    loaded:     an already loaded (model, tokenizer) pair to reuse; each pattern is applied
                to it (nothing is done when it already carries the pattern)
    progress:   receives each cell's begin, advance and end (the CLI draws a progress bar)
    notify:     receives one-line notices: a resumed cell, an untrusted progress file
                (default: printed to stderr)
    keep_progress: leave the complete progress files of the finished cells for the caller
                to remove with ``resume.remove_progress(records)`` once a larger run is
                done; by default they are removed at the end

    The settings are checked once (``settings.check()``; a checked object is not checked
    again). Cells run pattern by pattern, then task by task, then ctx by ctx; with
    ``settings.out`` each record is written as soon as its cell is done. Inside an
    initialized torch.distributed process group the windows are shared among the ranks;
    every rank returns the same records, and only rank 0 writes files.
    """
    if settings is None:
        settings, options = EvalSettings.from_options(options)
    elif not isinstance(settings, EvalSettings):
        raise TypeError(f"settings must be an EvalSettings, not {type(settings).__name__}; give other "
                        "settings as keywords (evaluate(model, ctx=..., pattern=...))")
    else:
        given = sorted(set(options) & set(EvalSettings.__dataclass_fields__) | set(options) & {"pattern"})
        if given:
            raise TypeError(f"{', '.join(given)}: give settings either in the EvalSettings or as keywords, not both")
    settings.check()
    specs = settings.pattern_specs
    ranks = distributed.current()
    say = (notify or notify_stderr) if ranks.is_main else (lambda message: None)
    warn_if_not_evaluation(settings.task_specs, say)

    if loaded is None:
        loaded = load_model(model, pattern=specs[0], dtype=settings.dtype, device=settings.device,
                            device_map=settings.device_map, attention_backend=settings.attention_backend, **options)
    lm, tokenizer = loaded
    if settings.compile and not is_compiled(lm):
        compile_for_evaluation(lm)
    check_trained_length(lm, settings.ctx, settings.allow_long_context, say)

    records, finished_progress = [], []
    for spec in specs:
        apply_pattern(lm, spec, backend=settings.attention_backend)  # nothing to do when it carries it
        for task_spec in settings.task_specs:
            tokenized = tokenize_task(task_spec, tokenizer, add_bos=settings.add_bos)
            for ctx in settings.ctx:
                record, progress_file = run_cell(lm, tokenizer, model, spec, tokenized, ctx, settings,
                                                 progress=progress if ranks.is_main else None, ranks=ranks,
                                                 notify=say)
                warn_if_not_finite(record, say)
                if settings.out is not None and ranks.is_main:
                    record["path"] = str(write_record(record, settings.out, say, stopped=stopped_runs(settings.out)))
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


def warn_if_not_finite(record: dict, say) -> None:
    """A perplexity of NaN or infinity is a true result of the model (NaN or huge weights, an
    overflow in its dtype), so it is recorded; but it is said, since a table shows it in one small cell."""
    perplexity = (record.get("metrics") or {}).get("perplexity")
    if perplexity is not None and not math.isfinite(perplexity):
        say(f"warning: perplexity is {perplexity} at ctx {record['ctx']} · {record['pattern']} · {record['task']}: "
            "the model's losses are not finite (NaN or infinite weights, or an overflow in its dtype)")


def run_cost_line(model_id: str, loaded, settings: EvalSettings) -> str | None:
    """The line said before the first cell of a run of several cells: how many, how many tokens
    to score in all, and how long that takes at the rates earlier runs reached on this device."""
    from .evaluation import cost
    from .evaluation.engine import model_device
    from .records import device_name

    lm, tokenizer = loaded
    device = model_device(lm)
    device_text = device_name(device)
    cells = []
    for task_spec in settings.task_specs:
        tokenized = tokenize_task(task_spec, tokenizer, add_bos=settings.add_bos)
        for c in settings.ctx:
            tokens = settings.protocol.scored_tokens(tokenized, c, settings.max_tokens)
            cells += [(tokens, cost.remembered_rate(device_text, model_id, record_pattern_name(spec), c))
                      for spec in settings.pattern_specs]
    return cost.run_line(cells, on_cpu=device.type == "cpu")
