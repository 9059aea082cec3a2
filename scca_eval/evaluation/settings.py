"""The settings of an evaluation: one frozen object, built once, checked once, passed whole.

``scca-eval ppl``, ``scca-eval sweep`` (its options and its YAML file) and Python callers
build an :class:`EvalSettings`; ``check()`` refuses a bad value with one line that names
the option; ``evaluate(model, settings)`` (``api.py``) runs it as it is, and each cell
(``cells.py``) reads what it needs from it. The protocol is chosen here once from its name
(``protocols.py``); a sweep holds one settings object per cell (``for_cell``), and the
record a cell writes and the identity the sweep predicts for it come from that object.

What is not here: the model and how it is loaded (adapter, RoPE scaling, tokenizer, ...:
``models.load_model`` options), and what a caller does while it runs (progress bar, notices).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping

from ..errors import UserError
from .protocols import Protocol, protocol_named

# The settings a sweep file may give, and how each is written there (evaluation/sweep.py reads them).
SWEEP_FILE_KINDS = {
    "patterns": "patterns", "ctx": "ints", "tasks": "strings", "data": "strings", "protocol": "string",
    "stride": "int", "last_window": "string", "max_tokens": "int", "batch_size": "int", "dtype": "string",
    "device": "string", "chunk_size": "int", "dilation": "int", "add_bos": "bool", "allow_long_context": "bool",
    "seed": "int", "attention_backend": "string", "compile": "bool",
}


def _items(value) -> tuple:
    """One value or several as a tuple (a custom mix written as a YAML list is one pattern
    only when it comes alone through ``pattern=``; ``patterns`` is always a list of them)."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,)


@dataclass(frozen=True)
class EvalSettings:
    """Every setting of an evaluation over tasks × patterns × ctx (defaults: ``scca-eval ppl``'s)."""

    # what is evaluated
    tasks: tuple[str, ...] = ()          # task names or YAML paths; none and no data: the sample tasks
    data: tuple[str, ...] = ()           # files or folders evaluated as ad-hoc tasks
    ctx: tuple[int, ...] = (1024,)       # window lengths in tokens
    patterns: tuple = ("full",)          # preset names, custom mixes (text or YAML list), or PatternSpecs
    chunk_size: int | None = None        # G of the chunked rules (default: a quarter of the window)
    dilation: int | None = None          # r of sda (default 2)
    max_tokens: int | None = None        # cap on scored tokens per (task, ctx)
    allow_long_context: bool = False     # evaluate a ctx beyond the model's RoPE settings
    # how it is measured
    protocol: Protocol | str = "stride"  # a name becomes its Protocol (protocols.py)
    stride: int | None = None            # default: ctx (stride), lm-eval: none, longlora: 256
    last_window: str = "full"            # "full" or "short" (how a document's last window ends)
    add_bos: bool = False                # BOS in front of every document (context, never scored)
    seed: int = 0                        # seed of the bootstrap interval
    # how it runs
    batch_size: int | None = None        # windows per forward pass (default: by device and ctx)
    dtype: str | None = None             # for a model loaded by evaluate (default: fp32 on CPU, bf16 on GPU)
    device: str | None = None            # for a model loaded by evaluate
    device_map: str | None = None        # accelerate's device map (recorded in each record)
    attention_backend: str = "auto"
    compile: bool = False                # compile the decoder layers and the loss step first
    # where it is written
    out: str | None = None               # folder for the records (None: none written, no progress kept)
    save_every: int | None = None        # save progress after about this many batches (default 32)
    resume: bool = True                  # continue a cell from its progress file when one matches

    def __post_init__(self):
        # Lists become tuples (the object is frozen all through); the protocol is chosen here, once.
        for name in ("tasks", "data", "ctx", "patterns"):
            object.__setattr__(self, name, _items(getattr(self, name)))
        if self.out is not None:
            object.__setattr__(self, "out", str(self.out))
        object.__setattr__(self, "protocol", protocol_named(self.protocol))

    # ------------------------------------------------------------ building

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> tuple[EvalSettings, dict]:
        """Settings from keyword options (``evaluate(...)``'s keywords, a command's options):
        those named as fields (and ``pattern=`` for one pattern) become settings; an empty
        or None option keeps the default. The rest is returned as they came: model-loading
        options (adapter, rope_scaling, ...)."""
        names = {f.name for f in dataclasses.fields(cls)}
        options = dict(options)
        values: dict[str, Any] = {}
        pattern = options.pop("pattern", None)
        if pattern is not None:
            values["patterns"] = (pattern,)
        for name in names & set(options):
            value = options.pop(name)
            if value is not None and not (isinstance(value, (list, tuple)) and not value):
                values[name] = value
        return cls(**values), options

    def for_cell(self, *, pattern, ctx: int, task: str | None = None, data: str | None = None,
                 task_spec=None) -> EvalSettings:
        """These settings narrowed to one cell: one of their (resolved) patterns, one of their
        ctx, and one of their tasks, by name or by data path (``task_spec``: its TaskSpec)."""
        return self._narrowed(dict(patterns=(pattern,), ctx=(ctx,), tasks=() if task is None else (task,),
                                   data=() if data is None else (data,)),
                              pattern_specs=[pattern], task_specs=None if task_spec is None else [task_spec])

    def for_patterns(self, specs) -> EvalSettings:
        """These settings with their patterns given as the (resolved) specs ``specs`` of them."""
        return self._narrowed(dict(patterns=tuple(specs)), pattern_specs=list(specs),
                              task_specs=self.__dict__.get("task_specs"))

    def _narrowed(self, changes: dict, *, pattern_specs, task_specs) -> EvalSettings:
        # Some of their own values only: a checked object stays checked, its resolved specs kept.
        narrowed = dataclasses.replace(self, **changes)
        if self.__dict__.get("_checked"):
            narrowed.__dict__.update(_checked=True, pattern_specs=pattern_specs)
            if task_specs is not None:
                narrowed.__dict__["task_specs"] = task_specs
        return narrowed

    # ------------------------------------------------------------ checking

    def check(self) -> None:
        """Refuse a bad setting with one line naming its option; runs once per object
        (``evaluate`` calls it again for free)."""
        if self.__dict__.get("_checked"):
            return
        from ..validation import (check_attention_backend, check_ctx_and_stride, check_dtype_name,
                                  check_out_folder, check_out_outside_data, check_run_options)

        if not self.ctx:
            raise UserError("--ctx: give at least one window length, e.g. --ctx 1024")
        if not self.patterns:
            raise UserError("--pattern: give at least one pattern, e.g. --pattern full")
        self.protocol.check(self)
        check_ctx_and_stride(self.ctx, self.protocol.bounded_stride(self))
        check_run_options(batch_size=self.batch_size, max_tokens=self.max_tokens, save_every=self.save_every)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"--seed must be a whole number of at least 0 (got {self.seed!r})")
        check_dtype_name(self.dtype)
        check_attention_backend(self.attention_backend)
        check_out_folder(self.out)
        check_out_outside_data(self.out, self.data)
        self.pattern_specs  # resolved and checked against every ctx
        self.task_specs  # every task found, its data there
        self.__dict__["_checked"] = True

    @cached_property
    def pattern_specs(self) -> list:
        """The patterns as PatternSpecs, each checked against every ctx (``validation.resolve_patterns``)."""
        from ..validation import resolve_patterns

        return resolve_patterns(self.patterns, self.ctx, chunk_size=self.chunk_size, dilation=self.dilation)

    @cached_property
    def task_specs(self) -> list:
        """The TaskSpecs of ``tasks`` then ``data`` (neither: the sample tasks)."""
        from ..validation import resolve_tasks

        return resolve_tasks(self.tasks, self.data)
