"""``finetune``: LoRA fine-tuning of a model under an attention pattern, start to finish.

Order: every cheap check (options, pattern, output folder), then the model (with its
RoPE scaling and the pattern applied through the same AttentionInterface registration
evaluation uses), the data as training windows, LoRA, the checkpoint to resume from, the
steps (a checkpoint every ``save_every``), and the results. Ctrl-C finishes nothing more,
saves a checkpoint of the last finished step and raises :class:`~scca_eval.resume.Interrupted`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch

from ..errors import UserError
from ..resume import Interrupted
from . import checkpoint as ckpt
from .lora import (attach_lora, compile_layers, enable_gradient_checkpointing, keep_activations_in,
                   trainable_parameters)
from .loop import StepAbandoned, Trainer
from .recipe import DEFAULT_TASKS, Recipe, split_names
from .record import training_record
from .windows import build_stream


class TrainingProgress(Protocol):
    """What ``finetune`` reports while it runs (the CLI draws a progress bar)."""

    def begin(self, label: str, total_steps: int, done_steps: int) -> None: ...
    def step(self, result: dict) -> None: ...
    def end(self) -> None: ...


def _say(message: str) -> None:
    import sys

    print(f"scca-eval: {message}", file=sys.stderr, flush=True)


def finetune(
    model: str = "default",
    *,
    ctx: int,
    out: str | os.PathLike,
    pattern="full",
    tasks: Iterable[str] | None = None,
    data: Iterable[str] | None = None,
    rope_scaling: str | None = None,
    original_ctx: int | None = None,
    chunk_size: int | None = None,
    dilation: int | None = None,
    attention_backend: str = "auto",
    dtype: str | None = None,
    device: str | None = None,
    resume: bool = False,
    allow_long_context: bool = False,
    progress: TrainingProgress | None = None,
    notify: Callable[[str], None] | None = None,
    **recipe_options,
) -> dict:
    """Fine-tune ``model`` with LoRA under ``pattern`` on ctx-token windows; returns training.json.

    ``recipe_options`` are the fields of :class:`~scca_eval.training.recipe.Recipe` (steps,
    batch_size, grad_accum or tokens_per_step, lr, warmup_steps, seed, lora_rank,
    lora_alpha, lora_dropout, lora_targets, trainable, gradient_checkpointing, compile, offload_activations,
    save_every, …); the defaults are LongLoRA's. ``tasks``/``data`` name the training text
    as ``ppl`` takes it (default: the bundled training samples, disjoint from the
    evaluation samples). The folder ``out`` receives a peft adapter, ``trainable_params.bin``,
    ``training.json`` and ``checkpoint.pt``; ``resume=True`` continues the run whose
    checkpoint is there.
    """
    from ..data import load_task, task_from_data_path, tokenize_task
    from ..data.corpora import require_built
    from ..models import load_model, model_record, parse_rope_scaling, trained_length
    from ..validation import resolve_patterns

    from ..distributed import current

    ranks = current()  # several processes under torchrun: the passes of each step are shared
    say = (notify or _say) if ranks.is_main else (lambda message: None)
    if not ranks.is_main:
        progress = None
    for name in ("lora_targets", "trainable"):
        if name in recipe_options:
            recipe_options[name] = split_names(recipe_options[name], "--" + name.replace("_", "-"))
    try:
        recipe = Recipe(ctx=ctx, **recipe_options)
    except TypeError as error:
        raise UserError(f"finetune: {error}") from None
    recipe.check()
    if recipe.accumulation % ranks.world_size:
        raise UserError(f"{ranks.world_size} processes share each step's {recipe.accumulation} passes: give "
                        f"--grad-accum (or --tokens-per-step) as a multiple of {ranks.world_size}")
    (spec,) = resolve_patterns([pattern], [ctx], chunk_size=chunk_size, dilation=dilation)
    parse_rope_scaling(rope_scaling, ctx)
    out = Path(out).expanduser()
    resume_from = ckpt.check_out_folder(out, resume)
    names, paths = list(tasks or []), list(data or [])
    if not names and not paths:
        names = list(DEFAULT_TASKS)
    task_specs = [load_task(name) for name in names] + [task_from_data_path(path) for path in paths]
    for task_spec in task_specs:
        require_built(task_spec)

    lm, tokenizer = load_model(model, pattern=spec, dtype=dtype, device=device,
                               attention_backend=attention_backend, rope_scaling=rope_scaling, original_ctx=original_ctx,
                               finetuned_ctx=ctx)
    limit = trained_length(lm)
    if limit is not None and ctx > limit and not allow_long_context:
        raise UserError(f"ctx {ctx} is beyond the {limit} tokens the model's RoPE settings cover: extend them "
                        f"with --rope-scaling longlora (LongLoRA's rule, here linear:{-(-ctx // limit)}) or another "
                        "scaling, or train without one with --allow-long-context")
    described = model_record(lm, tokenizer)
    device_ = next(lm.parameters()).device
    weights_dtype = next(lm.parameters()).dtype

    stream = build_stream([tokenize_task(t, tokenizer) for t in task_specs], tokenizer.eos_token_id, ctx)
    peft_model = attach_lora(lm, recipe, model)
    if recipe.gradient_checkpointing:
        enable_gradient_checkpointing(peft_model)
    if recipe.compile:
        compile_layers(peft_model)
    _check_disk_space(out, peft_model)
    autocast = None if weights_dtype == torch.float32 else weights_dtype
    if autocast is not None:
        keep_activations_in(peft_model, autocast)
    trainer = Trainer(peft_model, stream, recipe, device_, autocast, ranks=ranks)

    key = ckpt.run_key(model=described, pattern=spec.to_dict(), rope_scaling=described["rope_scaling"], ctx=ctx,
                       data=stream.fingerprint, recipe=recipe.to_dict(), dtype=str(weights_dtype))
    resumed_at = None
    if resume_from is not None:
        ckpt.restore(resume_from, key, trainer)
        resumed_at = trainer.history.step
        if resumed_at > recipe.steps:
            raise UserError(f"the checkpoint in {out} is at step {resumed_at}, beyond --steps {recipe.steps}; "
                            f"give --steps {resumed_at} or more")
        say(f"resuming {out} from step {resumed_at} of {recipe.steps}")

    from ..records import record_pattern_name  # noqa: PLC0415  (a pure naming rule, shared with ppl records)

    def record(finished: bool) -> dict:
        return training_record(
            model=described, pattern_name=record_pattern_name(spec), pattern=spec.to_dict(),
            rope_scaling=described["rope_scaling"], ctx=ctx, data=stream.describe(), recipe=recipe.to_dict(),
            history=trainer.history, dtype=str(weights_dtype).removeprefix("torch."), device=device_,
            resumed_from=resumed_at, attention_backend=attention_backend, finished=finished)

    checkpoint_path = out / ckpt.CHECKPOINT
    label = f"finetune · {record_pattern_name(spec)} · ctx {ctx}"
    if progress is not None:
        progress.begin(label, recipe.steps, trainer.history.step)
    saved_step = resumed_at  # the step the checkpoint on disk holds
    try:
        with _stop_on_sigint(trainer):
            while trainer.history.step < recipe.steps:
                result = trainer.step()
                if progress is not None:
                    progress.step(result)
                if trainer.history.step % recipe.save_every == 0 or trainer.history.step == recipe.steps:
                    if ranks.is_main:
                        ckpt.save(checkpoint_path, key, trainer)
                    saved_step = trainer.history.step
    except torch.OutOfMemoryError:
        kept = f"; the checkpoint of step {saved_step} in {out} is kept" if saved_step else ""
        raise UserError(f"out of memory at ctx {ctx} with {recipe.batch_size} window(s) per pass: give a smaller "
                        "--batch-size (and a larger --grad-accum), keep --gradient-checkpointing on, or train in "
                        f"--dtype bfloat16{kept}") from None
    except StepAbandoned:  # the first Ctrl-C: the model is as the last finished step left it
        if trainer.history.step == 0:
            raise Interrupted("interrupted before the first step finished; nothing to save") from None
        if ranks.is_main:
            ckpt.save(checkpoint_path, key, trainer)
        raise Interrupted(f"interrupted: step {trainer.history.step} of {recipe.steps} is saved in "
                          f"{checkpoint_path}; run the same command with --resume to continue") from None
    except KeyboardInterrupt:  # a second Ctrl-C stops at once, perhaps inside an update: nothing is saved
        kept = (f"the checkpoint of step {saved_step} in {checkpoint_path} is kept; run the same command with "
                "--resume to continue" if saved_step else "no checkpoint was saved yet")
        raise Interrupted(f"stopped at once: {kept}") from None
    finally:
        if progress is not None:
            progress.end()
    final = record(finished=True)
    final["runtime"]["processes"] = ranks.world_size
    if ranks.is_main:
        ckpt.write_results(out, peft_model, final)
    return final


@contextlib.contextmanager
def _stop_on_sigint(trainer: Trainer):
    """The first Ctrl-C asks the trainer to stop after the pass it is in; a second stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer.stop_requested:
            raise KeyboardInterrupt
        trainer.stop_requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_disk_space(out: Path, peft_model) -> None:
    """Refuse to start when the checkpoint (weights and two AdamW moments) cannot fit."""
    need = sum(p.numel() * 4 * 3 for p in trainable_parameters(peft_model).values())
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < need * 2:  # the new checkpoint is written next to the old one before replacing it
        raise UserError(f"not enough disk space for the checkpoints in {out}: about {need * 2 / 2**30:.1f} GiB "
                        f"needed, {free / 2**30:.1f} GiB free; free some space or choose another --out")
