"""One optimizer step at a time: forward, chunked loss, backward, clip, AdamW, schedule.

The loss of a window is the mean next-token NLL over its ``ctx - 1`` targets, as
``model(ids, labels=ids).loss`` gives, but computed from the decoder's hidden states a
chunk of positions at a time, each chunk under activation checkpointing: the full
``[batch, ctx, vocab]`` logits (and their fp32 copy) never exist, in the forward or the
backward pass. A step averages over all its windows (``batch_size`` per pass, ``grad_accum``
passes), so it does not depend on how the windows are split into passes.

On a GPU the tensors autograd keeps for the backward pass can wait in pinned host memory
(``Recipe.offload_activations``, training/offload.py). Under gradient checkpointing
those are mainly each decoder layer's input, ``[batch, ctx, hidden]`` per layer, which
otherwise grow with ctx × layers; each comes back to the GPU when its layer is recomputed.
By default they are offloaded only where keeping them would not fit (training/offload.py).

The forward pass of a step goes through :class:`WindowLoss`, one module, so that a sharded
run (``sharding.py``) has a root module through which FSDP runs every layer and the head.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..distributed import SINGLE, all_agree
from .lora import has_compiled_layers, trainable_parameters
from .offload import ActivationPlace
from .recipe import Recipe
from .windows import TrainingStream, batch_ids


class StepAbandoned(Exception):
    """A stop was asked for inside a step; the model is as the last finished step left it."""


@dataclass
class History:
    """What the run did so far (saved in every checkpoint, reported in training.json)."""

    step: int = 0
    position: int = 0  # windows consumed
    tokens: int = 0  # input tokens trained on
    seconds: float = 0.0  # training time (the steps alone), over every resumed part of the run
    loss: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    grad_norm: list = field(default_factory=list)
    # Validation points (validation_loss.py): step, tokens, loss, window_losses, seconds.
    validation: list = field(default_factory=list)
    validation_set: str | None = None  # fingerprint of the windows the points were measured on
    eval_seconds: float = 0.0  # time spent on validation, not counted in ``seconds``

    _KEYS = ("step", "position", "tokens", "seconds", "loss", "lr", "grad_norm", "validation", "validation_set",
             "eval_seconds")

    def to_dict(self) -> dict:
        return {key: (list(value) if isinstance(value, list) else value)
                for key, value in ((key, getattr(self, key)) for key in self._KEYS)}

    @classmethod
    def from_dict(cls, data: dict) -> "History":
        # A checkpoint made before validation existed lacks its entries: they keep their defaults.
        return cls(**{key: data[key] for key in cls._KEYS if key in data})


def _chunk_nll_sum(head, softcap, rows, targets):
    logits = head(rows).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def window_nll_sum(peft_model, input_ids: torch.Tensor, loss_chunk: int = 1024) -> torch.Tensor:
    """Sum of the next-token NLL over every window of ``input_ids`` ([B, N]); float32 scalar."""
    base = peft_model.get_base_model()
    hidden = base.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    head = base.get_output_embeddings()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = input_ids[:, 1:].reshape(-1)
    total = None
    for begin in range(0, len(targets), loss_chunk):
        part = checkpoint(_chunk_nll_sum, head, softcap, rows[begin:begin + loss_chunk],
                          targets[begin:begin + loss_chunk], use_reentrant=False)
        total = part if total is None else total + part
    return total


class WindowLoss(torch.nn.Module):
    """The training forward pass as one module: token windows in, summed next-token NLL out.

    A sharded run (FSDP2) needs one root module whose forward runs every sharded layer and
    the loss head; the model's own forward would compute the full logits."""

    def __init__(self, peft_model, loss_chunk: int = 1024):
        super().__init__()
        self.model = peft_model
        self.loss_chunk = loss_chunk

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return window_nll_sum(self.model, input_ids, self.loss_chunk)


def clip_gradients(parameters: list, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` in its two halves, so that a norm over sharded gradients (DTensors,
    each rank holding a part) is made whole before the gradients are scaled by it."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if hasattr(total, "full_tensor"):  # a DTensor: the norm of this rank's shards, partial
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


def _sum_over_ranks(tensors: list[torch.Tensor], ranks) -> None:
    """Sum each tensor over the ranks, in place (one flat buffer per dtype: few collectives)."""
    import torch.distributed as dist

    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for tensor in group:
            tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def make_optimizer(peft_model, recipe: Recipe):
    """AdamW over the trainable weights and transformers' constant-with-warm-up schedule."""
    from transformers import get_constant_schedule_with_warmup

    optimizer = torch.optim.AdamW(list(trainable_parameters(peft_model).values()), lr=recipe.lr,
                                  betas=tuple(recipe.adam_betas), eps=recipe.adam_eps,
                                  weight_decay=recipe.weight_decay)
    return optimizer, get_constant_schedule_with_warmup(optimizer, recipe.warmup_steps)


class Trainer:
    """Runs steps of the recipe over the stream; ``history`` says where it stands."""

    def __init__(self, peft_model, stream: TrainingStream, recipe: Recipe, device: torch.device,
                 autocast_dtype: torch.dtype | None, history: History | None = None, ranks=SINGLE,
                 notify=None, loss: WindowLoss | None = None, sharded: bool = False):
        self.model, self.stream, self.recipe, self.device = peft_model, stream, recipe, device
        self.ranks = ranks
        # Sharded (FSDP2): ``loss`` is the sharded root and FSDP sums the gradients itself.
        self.loss = loss if loss is not None else WindowLoss(peft_model, recipe.loss_chunk)
        self.sharded = sharded
        self.optimizer, self.scheduler = make_optimizer(peft_model, recipe)
        self.parameters = list(trainable_parameters(peft_model).values())
        self.autocast_dtype = autocast_dtype
        self.history = history or History()
        self.stop_requested = False  # set from a signal handler: finish no more passes
        self.activations = ActivationPlace(recipe.offload_activations, device, recipe.max_memory_gib, notify)
        # With compiled layers the first pass runs eagerly: every attention layer then builds
        # its pattern's layout (host code) before anything is traced, and the traced layers
        # find it cached and compile into whole graphs (no graph break in every later step).
        self._eager_passes = 1 if has_compiled_layers(peft_model) else 0

    @property
    def eager_passes_left(self) -> int:
        """Passes still to run eagerly before the compiled layers run (and compile)."""
        return self._eager_passes

    def _eager_if_first(self):
        if not self._eager_passes:
            return contextlib.nullcontext()
        self._eager_passes -= 1
        return torch.compiler.set_stance("force_eager")

    def mark_step_begin(self) -> None:
        """Under CUDA graphs, tell torch that a new step (or validation window) begins: the
        graphs' outputs of the last one may be overwritten from here on."""
        if self.recipe.cuda_graphs is True:  # "auto" is decided before a Trainer is made (step_plan.py)
            torch.compiler.cudagraph_mark_step_begin()

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def step(self) -> dict:
        """One optimizer step; returns its loss, lr, gradient norm, tokens and seconds."""
        recipe, history = self.recipe, self.history
        started = time.perf_counter()
        self.mark_step_begin()
        targets = recipe.windows_per_step * (recipe.ctx - 1)
        nll = torch.zeros((), dtype=torch.float64, device=self.device)
        self.model.train()
        ranks = self.ranks
        try:
            # With several processes, pass i of the step runs on rank i mod N (whole passes, so each
            # window is computed with the same neighbours as in one process).
            for index in range(ranks.rank, recipe.accumulation, ranks.world_size):
                if not all_agree(not self.stop_requested, ranks):  # every rank stops at the same pass
                    raise StepAbandoned
                first = history.position + index * recipe.batch_size
                ids = torch.from_numpy(batch_ids(self.stream, recipe.seed, first, recipe.batch_size))
                ids = ids.to(self.device, non_blocking=True)
                with self._eager_if_first():
                    with self.autocast(), self.activations.forward():
                        pass_nll = self.loss(ids)
                    (pass_nll / targets).backward()
                self.activations.after_pass(self.parameters, bool(self.optimizer.state))
                nll += pass_nll.detach().double()
        except BaseException:
            self.optimizer.zero_grad(set_to_none=True)  # a half-accumulated step is dropped
            raise
        if ranks.is_distributed:
            # Replicated: every rank holds whole gradients of its passes; sum them. Sharded: FSDP has
            # already summed them into each rank's shard (reduce-scatter); only the loss is left.
            grads = [] if self.sharded else [p.grad for p in self.parameters]
            _sum_over_ranks(grads + [nll], ranks)
        norm_limit = recipe.max_grad_norm if recipe.max_grad_norm > 0 else float("inf")
        grad_norm = clip_gradients(self.parameters, norm_limit)
        lr = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = float(nll.item()) / targets
        seconds = time.perf_counter() - started
        history.step += 1
        history.position += recipe.windows_per_step
        history.tokens += recipe.windows_per_step * recipe.ctx
        history.seconds += seconds
        history.loss.append(loss)
        history.lr.append(lr)
        history.grad_norm.append(float(grad_norm))
        return {"step": history.step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                "tokens": recipe.windows_per_step * recipe.ctx, "seconds": seconds}
