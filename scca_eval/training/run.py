"""``finetune``: LoRA fine-tuning of a model under an attention pattern, start to finish.

Order: every cheap check (``TrainSettings.check()``: options, pattern, tasks, output folder;
then those that need the process count), then the model (with its
RoPE scaling and the pattern applied through the same AttentionInterface registration
evaluation uses), the data as training windows, LoRA, the checkpoint to resume from, the
steps (a checkpoint every ``save_every``, a validation point every ``eval_every``), and the
results. Ctrl-C finishes nothing more, saves a checkpoint of the last finished step and raises
:class:`~scca_eval.evaluation.resume.Interrupted`. ``max_time`` ends the run at the first step boundary
after that much training time.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Callable, Protocol

import torch

from ..distributed import all_agree
from ..errors import UserError, is_out_of_memory
from ..evaluation.resume import Interrupted
from ..files import free_space
from ..records import record_pattern_name, training_record
from . import checkpoint as ckpt
from .convergence import convergence
from .lora import (attach_lora, compile_layers, enable_gradient_checkpointing, keep_activations_in,
                   trainable_parameters)
from .loop import StepAbandoned, Trainer
from .settings import TrainSettings
from .sharding import shard_for_training
from .step_plan import plan_for_model
from .tensorboard_log import TensorBoardLog
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
    settings: TrainSettings | None = None,
    *,
    progress: TrainingProgress | None = None,
    notify: Callable[[str], None] | None = None,
    **options,
) -> dict:
    """Fine-tune ``model`` with LoRA under a pattern on ctx-token windows; returns training.json.

    model:      "default" (embedded SmolLM2-135M), a model folder, a .gguf file or a hub id
    settings:   a :class:`~scca_eval.training.settings.TrainSettings` (ctx, out, pattern, tasks,
                data, rope_scaling, the recipe, validation, resume, ...; its fields say what each
                does). Instead of one, its fields and the :class:`~scca_eval.training.recipe.Recipe`'s
                may be given as keywords here: ``finetune("default", ctx=1024, out="run",
                pattern="s2", steps=200)`` builds ``TrainSettings.from_options`` of them.
    progress:   receives begin, each step, each validation point and end (the CLI draws a bar)
    notify:     receives one-line notices (default: printed to stderr)

    The recipe's defaults are LongLoRA's; the training text defaults to the bundled training
    samples, disjoint from the evaluation samples. The folder ``out`` receives a peft adapter,
    ``trainable_params.bin``, ``training.json`` and ``checkpoint.pt``; ``resume`` continues the run
    whose checkpoint is there. A run that reaches its ``steps`` removes its checkpoint (it holds
    the trainable weights and both AdamW moments) unless ``keep_checkpoint``: keep it to extend
    the run later with more ``steps``. ``shard`` (several processes, e.g. under torchrun) splits
    the model over the processes with FSDP2 instead of giving each a whole copy, for models
    larger than one GPU (:mod:`.sharding`); it writes the same files.

    ``eval_tasks``/``eval_data`` name validation text: its loss, with full attention, over
    a fixed set of ctx-token windows (at most ``eval_tokens`` tokens) is measured before
    the first step, every ``eval_every`` steps and after the last, without changing the
    training (``validation_loss.py``). ``log_dir`` writes TensorBoard event files there.
    The recipe's ``max_time`` stops the run at the first step boundary after that many
    seconds of training.
    """
    from ..data import tokenize_task
    from ..distributed import current, share_from_main
    from ..models import load_model, model_record, trained_length
    from ..models.loading import parse_device, parse_dtype

    if settings is None:
        settings = TrainSettings.from_options(options)
    elif not isinstance(settings, TrainSettings):
        raise TypeError(f"settings must be a TrainSettings, not {type(settings).__name__}; give other "
                        "settings as keywords (finetune(model, ctx=..., out=...))")
    elif options:
        raise TypeError(f"{', '.join(sorted(options))}: give settings either in the TrainSettings or as "
                        "keywords, not both")
    settings.check()
    ranks = current()  # several processes under torchrun: the passes of each step are shared
    say = (notify or _say) if ranks.is_main else (lambda message: None)
    if not ranks.is_main:
        progress = None
    recipe, ctx, shard = settings.recipe, settings.ctx, settings.shard
    if shard and not ranks.is_distributed:
        raise UserError("--shard splits the model over several processes: give --gpus N (N of at least 2), or "
                        "start with torchrun --nproc-per-node N")
    if recipe.accumulation % ranks.world_size:
        raise UserError(f"{ranks.world_size} processes share each step's {recipe.accumulation} passes: give "
                        f"--grad-accum (or --tokens-per-step) as a multiple of {ranks.world_size}")
    if recipe.cuda_graphs is True and parse_device(settings.device).type != "cuda":
        raise UserError("--cuda-graphs needs a CUDA GPU; train without it here")
    spec, attention_backend, eval_every = settings.pattern_spec, settings.attention_backend, settings.eval_every
    out, resume_from = settings.out_folder, settings.checkpoint_to_resume
    task_specs, eval_specs = settings.task_specs, settings.eval_specs
    dtype, device = settings.dtype, settings.device

    load_options = dict(pattern=spec, attention_backend=attention_backend, rope_scaling=settings.rope_scaling,
                        original_ctx=settings.original_ctx, finetuned_ctx=ctx)
    if shard:
        # The weights are read once, by rank 0, into host memory; the other ranks build the same
        # model on the meta device and receive their shards from rank 0 (sharding.py).
        rank_device = parse_device(device)
        dtype = parse_dtype(dtype, rank_device)
        lm, tokenizer = load_model(model, dtype=dtype, device="cpu", empty_weights=not ranks.is_main, **load_options)
    else:
        lm, tokenizer = load_model(model, dtype=dtype, device=device, **load_options)
    limit = trained_length(lm)
    if limit is not None and ctx > limit and not settings.allow_long_context:
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
                                          tokenizer.eos_token_id, ctx, settings.eval_tokens)
        shared = {t["name"] for t in validation.stream.tasks
                  if t["data_fingerprint"] in {u["data_fingerprint"] for u in stream.tasks}}
        if shared:
            say(f"note: the validation data {', '.join(sorted(shared))} is also training data; its loss is not "
                "a held-out loss")
    peft_model = attach_lora(lm, recipe, model)
    _check_disk_space(out, peft_model)
    autocast = None if weights_dtype == torch.float32 else weights_dtype
    if autocast is not None:
        keep_activations_in(peft_model, autocast)
    # auto's step (training/step_plan.py): from here on the recipe holds what runs
    plan = plan_for_model(recipe, peft_model, device_, autocast, single_process=not ranks.is_distributed)
    recipe = plan.recipe
    if device_.type == "cuda" and "auto" in (settings.recipe.gradient_checkpointing, settings.recipe.cuda_graphs):
        say(f"step: {plan.describe()['step']} ({plan.reason})")
    if recipe.gradient_checkpointing:
        enable_gradient_checkpointing(peft_model)
    if recipe.compile:
        compile_layers(peft_model, cuda_graphs=recipe.cuda_graphs)
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
            activations=trainer.activations.describe(), step=plan.describe())

    history = trainer.history
    tensorboard = None
    if settings.log_dir is not None and ranks.is_main:
        # Steps after the checkpoint that an earlier process logged are computed again: drop them.
        tensorboard = TensorBoardLog(settings.log_dir, purge_step=None if resumed_at is None else resumed_at + 1)
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
    except RuntimeError as error:  # torch.OutOfMemoryError, or a library's failed allocation
        if not is_out_of_memory(error):
            raise
        kept = f"; the checkpoint of step {saved_step} in {out} is kept" if saved_step else ""
        if (plan.prediction or {}).get("fits"):  # auto took the step without checkpointing
            raise UserError(f"out of memory at ctx {ctx} in the step without checkpointing that auto predicted "
                            f"would fit: give --gradient-checkpointing{kept}") from None
        if not recipe.gradient_checkpointing:  # asked for: --no-gradient-checkpointing or --cuda-graphs
            raise UserError(f"out of memory at ctx {ctx} in the step without checkpointing: give "
                            "--gradient-checkpointing (instead of --no-gradient-checkpointing or --cuda-graphs), or "
                            f"leave the step to auto{kept}") from None
        raise UserError(f"out of memory at ctx {ctx} with {recipe.batch_size} window(s) per pass: give a smaller "
                        "--batch-size (and a larger --grad-accum), or train in "
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
        if not settings.keep_checkpoint and stopped_by is None:  # a run stopped by --max-time may go on
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


def _check_disk_space(out: Path, peft_model) -> None:
    """Refuse to start when the checkpoint (weights and two AdamW moments) cannot fit."""
    need = sum(p.numel() * 4 * 3 for p in trainable_parameters(peft_model).values())
    free = free_space(out)
    if free < need * 2:  # the new checkpoint is written next to the old one before replacing it
        raise UserError(f"not enough disk space for the checkpoints in {out}: about {need * 2 / 2**30:.1f} GiB "
                        f"needed, {free / 2**30:.1f} GiB free; free some space or choose another --out")
