"""The settings of a fine-tuning run: one frozen object, built once, checked once, passed whole.

``scca-eval finetune`` and Python callers build a :class:`TrainSettings`; ``check()`` refuses
a bad value with one line that names the option, before a model is loaded; ``finetune(model,
settings)`` (``run.py``) runs it as it is. How the model is trained (optimizer, LoRA, steps,
checkpoints, ``max_time``) is the nested :class:`~.recipe.Recipe`: its ``to_dict()`` is
training.json's ``recipe`` and part of the checkpoint's key, so it holds nothing else.

What is not here: the model (``finetune``'s first argument, as for ``evaluate``), how many
processes share the run (``--gpus``, torchrun: checked by ``finetune`` against the ranks), and
what a caller does while it runs (progress bar, notices).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

from ..errors import UserError
from .recipe import DEFAULT_EVAL_TOKENS, DEFAULT_TASKS, Recipe

_RECIPE_FIELDS = frozenset(f.name for f in dataclasses.fields(Recipe)) - {"ctx"}


def _items(value) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(str(item) for item in value)
    return (str(value),)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainSettings:
    """Every setting of a fine-tuning run (defaults: ``scca-eval finetune``'s)."""

    # what is trained
    ctx: int                              # training window length in tokens
    out: str                              # folder for the adapter, training.json and checkpoint.pt
    pattern: Any = "full"                 # preset name, custom mix or PatternSpec
    chunk_size: int | None = None         # G of the chunked rules (default: a quarter of ctx)
    dilation: int | None = None           # r of sda (default 2)
    attention_backend: str = "auto"
    tasks: tuple[str, ...] = ()           # training tasks; none and no data: the bundled training samples
    data: tuple[str, ...] = ()            # files or folders trained on as ad-hoc tasks
    rope_scaling: str | None = None       # --rope-scaling text (e.g. "linear:2", "longlora")
    original_ctx: int | None = None       # the base model's trained length, where its config lacks it
    allow_long_context: bool = False      # train beyond the model's RoPE settings without scaling
    dtype: str | None = None              # of the frozen weights (default: fp32 on CPU, bf16 on GPU)
    device: str | None = None             # this process's device (default: a GPU where there is one)
    # how it is trained (its ctx is this ctx; built from the recipe's keywords by from_options)
    recipe: Recipe | None = None
    # validation loss under full attention
    eval_tasks: tuple[str, ...] = ()
    eval_data: tuple[str, ...] = ()
    eval_every: int | None = None         # steps between points (None: before the first and after the last)
    eval_tokens: int = DEFAULT_EVAL_TOKENS  # tokens of validation windows per point
    # where it is written, and how the run goes on
    resume: bool = False                  # continue the run whose checkpoint.pt is in out
    keep_checkpoint: bool = False         # keep checkpoint.pt when the run finishes
    log_dir: str | None = None            # TensorBoard event files
    shard: bool = False                   # split the model over the processes (FSDP2) instead of copying it

    def __post_init__(self):
        # Lists become tuples and paths text (the object is frozen all through).
        for name in ("tasks", "data", "eval_tasks", "eval_data"):
            object.__setattr__(self, name, _items(getattr(self, name)))
        for name in ("out", "log_dir"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
        if self.recipe is None:
            object.__setattr__(self, "recipe", Recipe(ctx=self.ctx))

    # ------------------------------------------------------------ building

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> TrainSettings:
        """Settings from keyword options (``finetune(...)``'s keywords, the command's options):
        the fields of this class and those of :class:`Recipe` (steps, lr, lora_rank, save_every,
        max_time, ...; their ctx is ``ctx``). A None option keeps the default; an unknown one is
        refused (TypeError, as a misspelt keyword is)."""
        options = {name: value for name, value in options.items() if value is not None}
        recipe_options = {name: options.pop(name) for name in _RECIPE_FIELDS & set(options)}
        if recipe_options and "recipe" in options:
            raise TypeError(f"{', '.join(sorted(recipe_options))}: give the recipe either as a Recipe or as "
                            "keywords, not both")
        unknown = set(options) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown fine-tuning setting(s): {', '.join(sorted(unknown))}")
        if "recipe" not in options and "ctx" in options:
            options["recipe"] = Recipe(ctx=options["ctx"], **recipe_options)
        return cls(**options)

    def on_device(self, device: str | None) -> TrainSettings:
        """These settings on ``device`` (a process's own GPU under torchrun); a checked object stays checked."""
        if device == self.device:
            return self
        moved = dataclasses.replace(self, device=device)
        moved.__dict__.update({name: value for name, value in self.__dict__.items()
                               if name not in {f.name for f in dataclasses.fields(self)}})
        return moved

    # ------------------------------------------------------------ checking

    def check(self) -> None:
        """Refuse a bad setting with one line naming its option; runs once per object
        (``finetune`` calls it again for free). Reads no model: the pattern, the RoPE
        scaling, the tasks, the output folder and the validation options."""
        if self.__dict__.get("_checked"):
            return
        from ..models import parse_rope_scaling
        from ..models.rope import check_original_ctx
        from ..validation import check_attention_backend, check_dtype_name, check_out_outside_data
        from .tensorboard_log import check_log_dir

        if not isinstance(self.recipe, Recipe):
            raise TypeError(f"recipe must be a Recipe, not {type(self.recipe).__name__}")
        self.recipe.check()  # --ctx first, then the recipe's own options
        if self.recipe.ctx != self.ctx:
            raise UserError(f"the recipe is for ctx {self.recipe.ctx} but --ctx is {self.ctx}; give one ctx")
        if self.original_ctx is not None and (not _whole(self.original_ctx) or self.original_ctx < 1):
            raise UserError(f"--original-ctx must be a whole number of at least 1 (got {self.original_ctx!r})")
        check_original_ctx(self.original_ctx, self.rope_scaling)
        check_dtype_name(self.dtype)
        check_attention_backend(self.attention_backend)
        if self.shard and self.recipe.compile:
            raise UserError("--compile (and --cuda-graphs, which compiles) is not available with --shard; "
                            "leave it out or train without --shard")
        if self.shard and (self.eval_tasks or self.eval_data):
            raise UserError("the validation loss (--eval-task, --eval-data) is not measured under --shard yet; "
                            "measure it afterwards with scca-eval ppl --adapter OUT, or train without --shard")
        self.pattern_spec  # resolved and checked against ctx
        parse_rope_scaling(self.rope_scaling, self.ctx)
        self._check_validation()
        for option, folder in (("--out", self.out), ("--log-dir", self.log_dir)):
            check_out_outside_data(folder, self.data, out_option=option)
            check_out_outside_data(folder, self.eval_data, out_option=option, data_option="--eval-data")
        if self.log_dir is not None:
            check_log_dir(self.log_dir)
        self.checkpoint_to_resume  # a folder of another run is refused
        self.task_specs  # every task found, its data there
        self.eval_specs
        self.__dict__["_checked"] = True

    def _check_validation(self) -> None:
        has_data = bool(self.eval_tasks or self.eval_data)
        if self.eval_every is not None:
            if not _whole(self.eval_every) or self.eval_every < 1:
                raise UserError(f"--eval-every must be a whole number of steps, at least 1 (got {self.eval_every!r})")
            if not has_data:
                raise UserError("--eval-every needs validation text: give --eval-task or --eval-data")
        if has_data and (not _whole(self.eval_tokens) or self.eval_tokens < self.ctx):
            raise UserError(f"--eval-tokens must be a whole number of at least one window, ctx {self.ctx} "
                            f"(got {self.eval_tokens!r})")

    @property
    def out_folder(self) -> Path:
        return Path(self.out).expanduser()

    @cached_property
    def pattern_spec(self):
        """The pattern as a PatternSpec checked against ctx (``validation.resolve_patterns``)."""
        from ..validation import resolve_patterns

        (spec,) = resolve_patterns([self.pattern], [self.ctx], chunk_size=self.chunk_size, dilation=self.dilation)
        return spec

    @cached_property
    def checkpoint_to_resume(self) -> Path | None:
        """The checkpoint ``resume`` continues (None: a new run); refuses a folder holding another run."""
        from .checkpoint import check_out_folder

        return check_out_folder(self.out_folder, self.resume)

    @cached_property
    def task_specs(self) -> list:
        """The TaskSpecs of ``tasks`` then ``data`` (neither: the bundled training samples)."""
        return _task_specs(self.tasks or (DEFAULT_TASKS if not self.data else ()), self.data)

    @cached_property
    def eval_specs(self) -> list:
        """The TaskSpecs of the validation text (none: no validation loss)."""
        return _task_specs(self.eval_tasks, self.eval_data, "--eval-data")


def _task_specs(names, paths, option: str = "--data") -> list:
    from ..data import load_task, task_from_data_path
    from ..data.corpora import require_built

    specs = [load_task(name) for name in names] + [task_from_data_path(path, option) for path in paths]
    for spec in specs:
        require_built(spec)
    return specs
