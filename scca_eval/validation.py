"""Checks of a run's settings, worded as the CLI options they come from.

Every command and ``evaluate`` run the same checks before anything slow starts (a model
load, a tokenization, processes for several GPUs): bad input fails with one line that
says what to do. An evaluation's settings are checked together by
``EvalSettings.check()`` (``evaluation/settings.py``, which calls these), the options only
some protocols take by the protocol (``evaluation/protocols.py``). Patterns are resolved
here, once, into the specs that travel on.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Iterable, Sequence

from .choices import ATTENTION_BACKENDS, DTYPES
from .errors import UserError
from .files import check_writable_folder


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
    check_writable_folder(path)


def check_out_outside_data(out, data: Iterable, *, out_option: str = "--out", data_option: str = "--data") -> None:
    """A folder a run writes to must not be a folder it reads text from, nor inside one: the next
    run would read the files written there (records, adapters, checkpoints) as documents."""
    if out is None:
        return
    written = Path(out).expanduser().resolve()
    for given in data:
        folder = Path(given).expanduser().resolve()
        if folder.is_dir() and (written == folder or folder in written.parents):
            where = "is" if written == folder else "is inside"
            raise UserError(f"{out_option} {out} {where} the {data_option} folder {given}, so the files written "
                            f"there would be read as text; give {out_option} a folder outside it")


def check_dtype_name(dtype: str | None) -> None:
    if dtype is not None and str(dtype).lower() not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")


def check_attention_backend(backend: str) -> None:
    if backend not in ATTENTION_BACKENDS:
        raise UserError(f"--attention-backend must be one of {', '.join(ATTENTION_BACKENDS)} (got {backend!r})")


def resolve_patterns(patterns: Iterable, ctxs: Sequence[int], *, chunk_size: int | None = None,
                     dilation: int | None = None) -> list:
    """Each pattern (a name, a mix, a YAML list or a resolved spec) as a spec checked against
    every ctx: the one place where a run's patterns are resolved and validated. Every pattern is
    read before any is checked against a ctx, so a misspelt one is named first."""
    from .patterns.parse import check_against_ctx

    specs = [resolve_pattern_spec(pattern, chunk_size=chunk_size, dilation=dilation) for pattern in patterns]
    for spec in specs:
        for ctx in ctxs:
            check_against_ctx(spec, ctx)
    return specs


def resolve_pattern_spec(pattern, ctxs: Sequence[int] = (), *, chunk_size: int | None = None,
                         dilation: int | None = None):
    """One pattern as :func:`resolve_patterns` resolves each: a spec, checked against every ctx
    given (none: only the pattern and its settings are checked)."""
    from .patterns.parse import check_against_ctx, resolve_pattern

    spec = resolve_pattern(pattern, chunk_size=chunk_size, dilation=dilation)
    for ctx in ctxs:
        check_against_ctx(spec, ctx)
    return spec


def resolve_tasks(tasks: Iterable[str] | None, data: Iterable[str] | None):
    """TaskSpecs from task names/YAML paths and --data paths (default: the sample tasks)."""
    from .data import load_task, task_from_data_path

    from .data.corpora import require_built

    tasks = list(tasks or [])
    data = list(data or [])
    if not tasks and not data:
        tasks = list(DEFAULT_TASKS)
    specs = [load_task(name) for name in tasks] + [task_from_data_path(path) for path in data]
    given = [f"--task {name}" for name in tasks] + [f"--data {path}" for path in data]
    first_of: dict[str, str] = {}
    for spec, text in zip(specs, given):
        if spec.name in first_of:  # records, tables and resuming tell tasks apart by name
            raise UserError(f"{first_of[spec.name]} and {text} are both the task {spec.name!r}: give each task "
                            "once (rename a --data folder or file, or write a task YAML with its own name)")
        first_of[spec.name] = text
    for spec in specs:
        require_built(spec)
    return specs


DEFAULT_TASKS = ("pg19_sample", "proof_pile_sample")

# Tasks already named in a warning (ppl runs one evaluate per pattern: one line per task).
_TRAINING_TASKS_WARNED: set[str] = set()


def warn_if_not_evaluation(task_specs, say=lambda message: None) -> None:
    """Say once per task when a training or validation task is evaluated."""
    for spec in task_specs:
        if spec.use == "evaluation" or spec.name in _TRAINING_TASKS_WARNED:
            continue
        _TRAINING_TASKS_WARNED.add(spec.name)
        purpose = ("fine-tuning text" if spec.use == "training"
                   else "held out from a training task, to watch a fine-tune")
        say(f"warning: {spec.name} is a {spec.use} task ({purpose}), not an evaluation sample; "
            "evaluating it anyway")


# The longest beyond-RoPE ctx each model was warned about (ppl runs one evaluate per pattern).
_LONG_CONTEXT_WARNED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def check_trained_length(model, ctxs: Sequence[int], allow_long_context: bool, say=lambda message: None) -> None:
    """Refuse a ctx beyond what the model's RoPE settings cover, naming a --rope-scaling that
    covers it; with ``allow_long_context``, say so once per model instead."""
    from .models import trained_length
    from .models.rope import beyond_length_message

    limit = trained_length(model)
    too_long = [c for c in ctxs if limit is not None and c > limit]
    if not too_long:
        return
    beyond = beyond_length_message(model, max(too_long))
    if not allow_long_context:
        raise UserError(f"{beyond}, or --allow-long-context evaluates it anyway")
    if _LONG_CONTEXT_WARNED.get(model) != max(too_long):  # once per model, not once per pattern
        _LONG_CONTEXT_WARNED[model] = max(too_long)
        say(f"warning: {beyond}; evaluating as it is (--allow-long-context)")
