"""``finetune``: LoRA fine-tuning of a model under an attention pattern, start to finish.

Order: every cheap check (options, pattern, output folder), then the model (with its
RoPE scaling and the pattern applied through the same AttentionInterface registration
evaluation uses), the data as training windows, LoRA, the checkpoint to resume from, the
steps (a checkpoint every ``save_every``, a validation point every ``eval_every``), and the
results. Ctrl-C finishes nothing more, saves a checkpoint of the last finished step and raises
:class:`~scca_eval.evaluation.resume.Interrupted`. ``max_time`` ends the run at the first step boundary
after that much training time.
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

from ..distributed import all_agree
from ..errors import UserError
from ..evaluation.resume import Interrupted
from ..records import record_pattern_name, training_record
from . import checkpoint as ckpt
from .convergence import convergence
from .lora import (attach_lora, compile_layers, enable_gradient_checkpointing, keep_activations_in,
                   trainable_parameters)
from .loop import StepAbandoned, Trainer
from .recipe import DEFAULT_EVAL_TOKENS, DEFAULT_TASKS, Recipe, split_names
from .sharding import shard_for_training
from .tensorboard_log import TensorBoardLog, check_log_dir
from .validation_loss import build_validation_set, evaluate
from .windows import build_stream


class TrainingProgress(Protocol):
    """What ``finetune`` reports while it runs (the CLI draws a progress bar)."""

    def begin(self, label: str, total_steps: int, done_steps: int) -> None: ...
    def step(self, result: dict) -> None: ...
    def validation(self, entry: dict) -> None: ...  # optional: a validation point (step, tokens, loss)
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
    keep_checkpoint: bool = False,
    shard: bool = False,
    allow_long_context: bool = False,
    progress: TrainingProgress | None = None,
    notify: Callable[[str], None] | None = None,
    eval_tasks: Iterable[str] | None = None,
    eval_data: Iterable[str] | None = None,
    eval_every: int | None = None,
    eval_tokens: int = DEFAULT_EVAL_TOKENS,
    log_dir: str | os.PathLike | None = None,
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
    checkpoint is there. A run that reaches its ``steps`` removes its checkpoint (it holds the
    trainable weights and both AdamW moments) unless ``keep_checkpoint``: keep it to extend the run
    later with more ``steps``. ``shard=True`` (several processes, e.g. under torchrun) splits
    the model over the processes with FSDP2 instead of giving each a whole copy, for models
    larger than one GPU (:mod:`.sharding`); it writes the same files.

    ``eval_tasks``/``eval_data`` name validation text: its loss, with full attention, over
    a fixed set of ctx-token windows (at most ``eval_tokens`` tokens) is measured before
    the first step, every ``eval_every`` steps and after the last, without changing the
    training (``validation_loss.py``). ``log_dir`` writes TensorBoard event files there.
    ``max_time`` (a recipe option) stops the run at the first step boundary after that
    many seconds of training.
    """
    from ..data import load_task, task_from_data_path, tokenize_task
    from ..data.corpora import require_built
    from ..models import load_model, model_record, parse_rope_scaling, trained_length
    from ..models.loading import parse_device, parse_dtype
    from ..validation import resolve_patterns

    from ..distributed import current, share_from_main

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
    if shard and not ranks.is_distributed:
        raise UserError("--shard splits the model over several processes: give --gpus N (N of at least 2), or "
                        "start with torchrun --nproc-per-node N")
    if shard and recipe.compile:
        raise UserError("--compile is not available with --shard; leave one of them out")
    if shard and (eval_tasks or eval_data):
        raise UserError("the validation loss (--eval-task, --eval-data) is not measured under --shard yet; "
                        "measure it afterwards with scca-eval ppl --adapter OUT, or train without --shard")
    if recipe.accumulation % ranks.world_size:
        raise UserError(f"{ranks.world_size} processes share each step's {recipe.accumulation} passes: give "
                        f"--grad-accum (or --tokens-per-step) as a multiple of {ranks.world_size}")
    (spec,) = resolve_patterns([pattern], [ctx], chunk_size=chunk_size, dilation=dilation)
    parse_rope_scaling(rope_scaling, ctx)
    eval_names, eval_paths = list(eval_tasks or []), list(eval_data or [])
    _check_validation_options(eval_names or eval_paths, eval_every, eval_tokens, ctx)
    if log_dir is not None:
        check_log_dir(log_dir)
    out = Path(out).expanduser()
    resume_from = ckpt.check_out_folder(out, resume)
    names, paths = list(tasks or []), list(data or [])
    if not names and not paths:
        names = list(DEFAULT_TASKS)
    task_specs = [load_task(name) for name in names] + [task_from_data_path(path) for path in paths]
    eval_specs = [load_task(name) for name in eval_names] + [task_from_data_path(path) for path in eval_paths]
    for task_spec in task_specs + eval_specs:
        require_built(task_spec)

    load_options = dict(pattern=spec, attention_backend=attention_backend, rope_scaling=rope_scaling,
                        original_ctx=original_ctx, finetuned_ctx=ctx)
    if shard:
        # The weights are read once, by rank 0, into host memory; the other ranks build the same
        # model on the meta device and receive their shards from rank 0 (sharding.py).
        rank_device = parse_device(device)
        dtype = parse_dtype(dtype, rank_device)
        lm, tokenizer = load_model(model, dtype=dtype, device="cpu", empty_weights=not ranks.is_main, **load_options)
    else:
        lm, tokenizer = load_model(model, dtype=dtype, device=device, **load_options)
    limit = trained_length(lm)
    if limit is not None and ctx > limit and not allow_long_context:
        raise UserError(f"ctx {ctx} is beyond the {limit} tokens the model's RoPE settings cover: extend them "
                        f"with --rope-scaling longlora (LongLoRA's rule, here linear:{-(-ctx // limit)}) or another "
                        "scaling, or train without one with --allow-long-context")
    # The weights are fingerprinted once, by rank 0 (a 70B model is 129 GiB to hash).
    described = share_from_main(model_record(lm, tokenizer) if ranks.is_main else None, ranks)
    device_ = rank_device if shard else next(lm.parameters()).device
    weights_dtype = next(lm.parameters()).dtype

    stream = build_stream([tokenize_task(t, tokenizer) for t in task_specs], tokenizer.eos_token_id, ctx)
    validation = None
    if eval_specs:
        validation = build_validation_set([tokenize_task(t, tokenizer) for t in eval_specs],
                                          tokenizer.eos_token_id, ctx, eval_tokens)
        shared = {t["name"] for t in validation.stream.tasks
                  if t["data_fingerprint"] in {u["data_fingerprint"] for u in stream.tasks}}
        if shared:
            say(f"note: the validation data {', '.join(sorted(shared))} is also training data; its loss is not "
                "a held-out loss")
    peft_model = attach_lora(lm, recipe, model)
    if recipe.gradient_checkpointing:
        enable_gradient_checkpointing(peft_model)
    if recipe.compile:
        compile_layers(peft_model)
    _check_disk_space(out, peft_model)
    autocast = None if weights_dtype == torch.float32 else weights_dtype
    if autocast is not None:
        keep_activations_in(peft_model, autocast)
    loss = None
    if shard:
        loss = shard_for_training(peft_model, device_, ranks.world_size, ranks.is_main, recipe.loss_chunk)
    trainer = Trainer(peft_model, stream, recipe, device_, autocast, ranks=ranks, notify=say, loss=loss,
                      sharded=shard)

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
        if validation is not None and trainer.history.validation and \
                trainer.history.validation_set != validation.fingerprint:
            raise UserError(f"the checkpoint in {out} measured its validation loss on other windows; resume "
                            "with the --eval-task/--eval-data and --eval-tokens it was started with")

    def record(stopped_by: str) -> dict:
        history = trainer.history
        return training_record(
            model=described, pattern_name=record_pattern_name(spec), pattern=spec.to_dict(),
            rope_scaling=described["rope_scaling"], ctx=ctx, data=stream.describe(), recipe=recipe.to_dict(),
            history=history, convergence=convergence(history.validation, history.step) if history.validation else None,
            dtype=str(weights_dtype).removeprefix("torch."), device=device_,
            resumed_from=resumed_at, attention_backend=attention_backend, finished=True, stopped_by=stopped_by,
            validation=validation.describe() if validation is not None else None, eval_every=eval_every,
            activations=trainer.activations.describe())

    history = trainer.history
    tensorboard = None
    if log_dir is not None and ranks.is_main:
        # Steps after the checkpoint that an earlier process logged are computed again: drop them.
        tensorboard = TensorBoardLog(log_dir, purge_step=None if resumed_at is None else resumed_at + 1)
    listeners = [listener for listener in (progress, tensorboard) if listener is not None]

    def validate_if_due(last: bool) -> None:
        """A validation point before the first step, every eval_every steps and after the last."""
        if validation is None or (history.validation and history.validation[-1]["step"] == history.step):
            return
        if last or history.step == 0 or (eval_every and history.step % eval_every == 0):
            entry = evaluate(trainer, validation, spec, attention_backend)
            for listener in listeners:
                if hasattr(listener, "validation"):
                    listener.validation(entry)

    def over_time() -> bool:
        # Every process must stop at the same step: stop when any one is past the limit.
        return recipe.max_time is not None and not all_agree(history.seconds < recipe.max_time, ranks)

    checkpoint_path = out / ckpt.CHECKPOINT
    label = f"ctx {ctx} · {record_pattern_name(spec)} · finetune"
    if progress is not None:
        progress.begin(label, recipe.steps, history.step)
    saved_step = resumed_at  # the step the checkpoint on disk holds
    stopped_by = "max_time" if over_time() else None  # a resumed run may be past --max-time already
    try:
        with _stop_on_sigint(trainer):
            validate_if_due(last=stopped_by is not None or history.step >= recipe.steps)
            while stopped_by is None and history.step < recipe.steps:
                result = trainer.step()
                for listener in listeners:
                    listener.step(result)
                if over_time():
                    stopped_by = "max_time"
                last = stopped_by is not None or history.step == recipe.steps
                validate_if_due(last)
                if history.step % recipe.save_every == 0 or last:
                    ckpt.save(checkpoint_path, key, trainer, write=ranks.is_main)
                    saved_step = history.step
    except torch.OutOfMemoryError:
        kept = f"; the checkpoint of step {saved_step} in {out} is kept" if saved_step else ""
        raise UserError(f"out of memory at ctx {ctx} with {recipe.batch_size} window(s) per pass: give a smaller "
                        "--batch-size (and a larger --grad-accum), keep --gradient-checkpointing on, or train in "
                        f"--dtype bfloat16{kept}") from None
    except StepAbandoned:  # the first Ctrl-C: the model is as the last finished step left it
        if trainer.history.step == 0:
            raise Interrupted("interrupted before the first step finished; nothing to save") from None
        ckpt.save(checkpoint_path, key, trainer, write=ranks.is_main)
        raise Interrupted(f"interrupted: step {trainer.history.step} of {recipe.steps} is saved in "
                          f"{checkpoint_path}; run the same command with --resume to continue") from None
    except KeyboardInterrupt:  # a second Ctrl-C stops at once, perhaps inside an update: nothing is saved
        kept = (f"the checkpoint of step {saved_step} in {checkpoint_path} is kept; run the same command with "
                "--resume to continue" if saved_step else "no checkpoint was saved yet")
        raise Interrupted(f"stopped at once: {kept}") from None
    finally:
        if progress is not None:
            progress.end()
        if tensorboard is not None:
            tensorboard.close()
    final = record(stopped_by or "steps")
    final["runtime"]["processes"] = ranks.world_size
    final["runtime"]["sharded"] = shard
    trained = ckpt.trainable_state(peft_model)  # gathered from every rank when sharded
    if ranks.is_main:
        ckpt.write_results(out, peft_model, trained, final)
        if not keep_checkpoint and stopped_by is None:  # a run stopped by --max-time may go on
            checkpoint_path.unlink(missing_ok=True)
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


def _check_validation_options(has_data: bool, eval_every: int | None, eval_tokens: int, ctx: int) -> None:
    if eval_every is not None:
        if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
            raise UserError(f"--eval-every must be a whole number of steps, at least 1 (got {eval_every!r})")
        if not has_data:
            raise UserError("--eval-every needs validation text: give --eval-task or --eval-data")
    if has_data and (isinstance(eval_tokens, bool) or not isinstance(eval_tokens, int) or eval_tokens < ctx):
        raise UserError(f"--eval-tokens must be a whole number of at least one window, ctx {ctx} "
                        f"(got {eval_tokens!r})")


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
