"""Validation loss during fine-tuning: held-out windows scored with full attention.

A run trained under a sparse pattern is evaluated the way its checkpoint will be, with
full attention (as LongLoRA and the SCCA paper evaluate), so the curve says how the
checkpoint itself improves rather than how well the model fits the pattern. The
validation text becomes one token stream as the training text does (``windows.py``), and
a fixed set of ``ctx``-token windows is taken from it, spread evenly over the stream
(first and last window included), at most ``max_tokens`` tokens in all. Every evaluation
scores the same windows, so two points of the curve differ only by the weights.

An evaluation leaves the training untouched: the model goes to eval mode under
``torch.no_grad``, its attention is switched to full for the evaluation alone (the
pattern lives in the model's config, ``attention/register.py``) and switched back, the
random number generators are restored afterwards (``torch.random.fork_rng``), and no
gradient or optimizer state is touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from .loop import Trainer, _sum_over_ranks, window_nll_sum
from .windows import TrainingStream, build_stream


@dataclass
class ValidationSet:
    """The fixed windows every evaluation scores."""

    stream: TrainingStream
    indices: list[int]  # window indices into the stream, ascending
    fingerprint: str

    @property
    def ctx(self) -> int:
        return self.stream.ctx

    def describe(self) -> dict:
        described = self.stream.describe()
        return {
            "attention": "full",
            "ctx": self.ctx,
            "windows": len(self.indices),
            "window_indices": self.indices,
            "tokens": len(self.indices) * self.ctx,
            "targets": len(self.indices) * (self.ctx - 1),
            "fingerprint": self.fingerprint,
            "stream": {key: described[key] for key in ("fingerprint", "tokens", "windows", "separator_eos_id")},
            "tasks": described["tasks"],
        }


def spread_indices(available: int, wanted: int) -> list[int]:
    """``wanted`` window indices spread evenly over ``available`` windows (all when fewer)."""
    if wanted >= available:
        return list(range(available))
    return sorted({int(round(i)) for i in np.linspace(0, available - 1, wanted)})


def build_validation_set(tokenized: list, eos_id: int | None, ctx: int, max_tokens: int) -> ValidationSet:
    """The validation windows: ``max_tokens // ctx`` of them (at least one), spread over the stream."""
    if max_tokens < ctx:
        raise UserError(f"--eval-tokens {max_tokens} is less than one window of ctx {ctx}; give at least {ctx}")
    try:
        stream = build_stream(tokenized, eos_id, ctx)
    except UserError:
        names = ", ".join(task.task.name for task in tokenized) or "the validation data"
        raise UserError(f"the validation data ({names}) holds fewer tokens than one window of ctx {ctx}: give "
                        "more with --eval-task / --eval-data, or a smaller --ctx") from None
    indices = spread_indices(stream.windows, max_tokens // ctx)
    digest = hashlib.sha256(f"{stream.fingerprint}|ctx={ctx}|{indices}".encode()).hexdigest()
    return ValidationSet(stream, indices, "sha256:" + digest)


@contextlib.contextmanager
def full_attention(model, pattern, backend: str):
    """Run ``model`` with full attention inside the block, then under ``pattern`` again."""
    if pattern.is_full:
        yield
        return
    from ..attention.register import apply_pattern
    from ..validation import resolve_pattern_spec

    apply_pattern(model, resolve_pattern_spec("full"))
    try:
        yield
    finally:
        apply_pattern(model, pattern, backend=backend)


def window_losses(trainer: Trainer, validation: ValidationSet, pattern, backend: str) -> list[float]:
    """The mean next-token loss of each validation window, under full attention, in eval mode.

    With several processes, window ``i`` is scored on rank ``i mod N`` and the losses are
    summed over the ranks, so every rank returns the same list.
    """
    model, ranks = trainer.model, trainer.ranks
    losses = torch.zeros(len(validation.indices), dtype=torch.float64, device=trainer.device)
    mine = range(ranks.rank, len(validation.indices), ranks.world_size)
    devices = [trainer.device] if trainer.device.type == "cuda" else []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), full_attention(model, pattern, backend):
            for row in mine:  # one window at a time: a loss per window, and no more memory than a step
                trainer.mark_step_begin()
                ids = torch.from_numpy(validation.stream.window(validation.indices[row])[None])
                with trainer.autocast():
                    nll = window_nll_sum(model, ids.to(trainer.device), trainer.recipe.loss_chunk)
                losses[row] = nll.double() / (validation.ctx - 1)
    finally:
        model.train(was_training)
    if ranks.is_distributed:
        _sum_over_ranks([losses], ranks)
    return [float(value) for value in losses.cpu()]


def evaluate(trainer: Trainer, validation: ValidationSet, pattern, backend: str) -> dict:
    """Score the validation windows now and add the point to the trainer's history."""
    started = time.perf_counter()
    losses = window_losses(trainer, validation, pattern, backend)
    seconds = time.perf_counter() - started
    history = trainer.history
    entry = {"step": history.step, "tokens": history.tokens, "loss": float(np.mean(losses)),
             "window_losses": losses, "seconds": round(seconds, 3)}
    history.validation.append(entry)
    history.validation_set = validation.fingerprint
    history.eval_seconds += seconds
    return entry
