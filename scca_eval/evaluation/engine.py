"""Run evaluation windows through a model and sum the NLL of the scored tokens.

The model's decoder runs on a batch of equal-length windows; the loss is then
computed only at the scored positions, a chunk of positions at a time, so the
full ``[batch, ctx, vocab]`` logits (let alone their fp32 copy) never exist.
Windows of different lengths are never padded into one batch: a pattern's
chunk size depends on the length the layer sees, and padding would change it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..attention.register import backend_of, pattern_of
from ..errors import UserError
from .windows import Window

# Tokens per forward batch when the user gives no --batch-size.
AUTO_BATCH_TOKENS = {"cpu": 8192, "cuda": 16384}


@dataclass
class WindowScores:
    """Per-window sums: ``nll_sum[i]`` over ``tokens[i]`` scored targets of window i."""

    nll_sum: np.ndarray  # float64
    tokens: np.ndarray  # int64

    def per_document(self, windows: Sequence[Window], n_docs: int) -> tuple[np.ndarray, np.ndarray]:
        nll = np.zeros(n_docs, dtype=np.float64)
        count = np.zeros(n_docs, dtype=np.int64)
        docs = np.fromiter((w.doc for w in windows), dtype=np.int64, count=len(windows))
        np.add.at(nll, docs, self.nll_sum)
        np.add.at(count, docs, self.tokens)
        return nll, count


def auto_batch_size(ctx: int, device: torch.device, windows: Sequence[Window] | None = None) -> int:
    """Windows per forward pass: a token budget per device type, and no more than the
    ctx-long ``windows`` there are (so a compiled model finds full batches to run compiled)."""
    budget = AUTO_BATCH_TOKENS.get(device.type, AUTO_BATCH_TOKENS["cpu"])
    size = max(1, min(64, budget // ctx))
    if windows:
        full = sum(1 for w in windows if w.fed == ctx)
        size = min(size, full or len(windows))
    return size


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def plan_batches(windows: Sequence[Window], batch_size: int) -> list[list[int]]:
    """How ``score_windows`` cuts ``windows`` into batches (window indices per batch):
    grouped by the length fed (first-seen order), then cut into runs of ``batch_size``."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, window in enumerate(windows):
        by_length[window.fed].append(index)
    return [
        indices[i : i + batch_size]
        for indices in by_length.values()
        for i in range(0, len(indices), batch_size)
    ]


def _target_nll(head: torch.nn.Module, softcap: float | None, hidden_rows: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden_rows).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="none")


# Models that ``compile_for_evaluation`` compiled; their loss step runs compiled too.
_COMPILED_MODELS: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
_compiled_target_nll = None
# The (batch shape, pattern, backend) cases each compiled model has run once eagerly (see
# score_windows).
_WARMED_CASES: "weakref.WeakKeyDictionary[torch.nn.Module, set]" = weakref.WeakKeyDictionary()


class _LogitHead:
    """Final norm output → NLL of the targets, for a few rows at a time."""

    def __init__(self, model: torch.nn.Module):
        global _compiled_target_nll
        self.head = model.get_output_embeddings()
        if self.head is None:
            raise UserError(f"{type(model).__name__} has no language-model head; give a causal LM")
        config = model.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        if getattr(config, "logit_scale", None) not in (None, 1, 1.0):
            raise UserError(
                f"{type(model).__name__} scales its logits (logit_scale); this architecture is not supported"
            )
        self._nll = _target_nll
        if model in _COMPILED_MODELS:
            if _compiled_target_nll is None:
                # The fp32 upcast and the log-softmax fuse into one pass over the logits.
                _compiled_target_nll = torch.compile(_target_nll)
            self._nll = _compiled_target_nll

    def nll(self, hidden_rows: torch.Tensor, targets: torch.Tensor, *, compiled: bool = True) -> torch.Tensor:
        nll = self._nll if compiled else _target_nll
        return nll(self.head, self.softcap, hidden_rows, targets)


@torch.inference_mode()
def score_windows(
    model: torch.nn.Module,
    documents: Sequence[np.ndarray],
    windows: Sequence[Window],
    *,
    batch_size: int | None = None,
    loss_chunk: int = 1024,
    progress: Callable[[int], None] | None = None,
    window_length: int | None = None,
) -> WindowScores:
    """NLL sums of every window's scored targets.

    ``documents[w.doc][w.start:w.start + w.fed]`` is fed for window ``w``; targets at
    indices ``w.score_from .. w.end - 1`` are scored, each predicted by the
    hidden state one position before it. ``progress(n)`` is called with the
    number of targets scored after each batch.

    A model compiled by ``compile_for_evaluation`` runs compiled only the batches
    of ``batch_size`` windows of ``window_length`` tokens (the protocol's ctx;
    default: the longest window given), and every other batch (a document's
    last, shorter window, a document shorter than ctx, a last partial batch)
    eagerly: compiling a graph for each of those shapes would cost more time
    than it saves. The first batch of the compiled shape under each pattern and
    backend also runs eagerly, so that the attention layers build their pattern's
    layout before anything is traced.
    """
    device = model_device(model)
    decoder = model.get_decoder()
    head = _LogitHead(model)
    tokens = np.zeros(len(windows), dtype=np.int64)
    if not windows:
        return WindowScores(np.zeros(len(windows), dtype=np.float64), tokens)
    # Sums stay on the device until the end: no host sync between batches, so the
    # host prepares the next batch while the device still computes this one.
    nll_sum = torch.zeros(len(windows), dtype=torch.float64, device=device)
    if batch_size is None:
        batch_size = auto_batch_size(window_length or max(w.fed for w in windows), device, windows)

    compiled = model in _COMPILED_MODELS
    compiled_shape = (batch_size, window_length or max(w.fed for w in windows))
    # a sweep applies one pattern after another to the same compiled model: each needs its warm-up
    warm_case = (compiled_shape, pattern_of(model), backend_of(model)) if compiled else None
    for batch in plan_batches(windows, batch_size):
        rows = [windows[i] for i in batch]
        input_ids = _to_device(np.stack([documents[w.doc][w.start : w.start + w.fed] for w in rows])
                               .astype(np.int64), device)
        run_compiled = compiled and tuple(input_ids.shape) == compiled_shape
        if run_compiled and warm_case not in _WARMED_CASES.setdefault(model, set()):
            # The first batch of a shape under a pattern runs eagerly: attention layers build
            # their pattern's layout then, and the compiled layers find it built when they are
            # traced (a layer traced without it would keep a graph break for good).
            _WARMED_CASES[model].add(warm_case)
            run_compiled = False
        with _eager_unless(run_compiled):
            hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        # With a device map the last layers (and the head) may sit on another device.
        out_device = hidden.device

        # Flat (row, position, window, target) of every scored target in the batch, copied
        # in one go. Targets come from the document: a window's last target may not be fed.
        pairs = []
        for row, (index, w) in enumerate(zip(batch, rows)):
            first = w.score_from - w.start - 1  # hidden position that predicts score_from
            count = w.end - w.score_from
            pairs.append(np.stack([np.full(count, row), np.arange(first, first + count), np.full(count, index),
                                   documents[w.doc][w.score_from : w.end].astype(np.int64)]))
            tokens[index] = count
        row_index, position, window_of_pair, targets = _to_device(np.concatenate(pairs, axis=1), out_device)
        window_of_pair = window_of_pair.to(device, non_blocking=True)

        for begin in range(0, len(targets), loss_chunk):
            end = begin + loss_chunk
            rows_h = hidden[row_index[begin:end], position[begin:end]]
            # Compiled for full chunks only: one compiled shape, not one per remainder.
            nll = head.nll(rows_h, targets[begin:end], compiled=len(rows_h) == loss_chunk).double().to(device)
            nll_sum.index_add_(0, window_of_pair[begin:end], nll)
        if progress is not None:
            progress(int(len(targets)))
    return WindowScores(nll_sum.cpu().numpy(), tokens)


def run_eagerly():
    """A context in which every compiled module and function runs eagerly."""
    return torch.compiler.set_stance("force_eager")


def _eager_unless(run_compiled: bool):
    return contextlib.nullcontext() if run_compiled else run_eagerly()


def is_compiled(model: torch.nn.Module) -> bool:
    """Whether ``compile_for_evaluation`` compiled ``model`` (recorded in each record's runtime)."""
    return model in _COMPILED_MODELS


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Copy to ``device`` without making the host wait: a copy from pageable memory
    waits until the device has finished its queued work, one from pinned memory does not."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def compile_for_evaluation(model: torch.nn.Module) -> None:
    """Compile each decoder layer in place (``nn.Module.compile``), so that the
    elementwise work around the matrix products (RMSNorm, RoPE, SiLU·mul,
    residual adds) runs as fused kernels, and the engine's loss step (head,
    fp32 upcast, cross-entropy) with it. Layers share one compiled graph, so
    the cost is one compilation per pattern and window length (see
    ``score_windows`` for the batches that run eagerly)."""
    layers = model.get_decoder().layers
    # One compiled entry per (pattern, ctx, batch) that a process evaluates, as in a
    # sweep; past dynamo's default limit of 8 the layers would silently run eagerly.
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 256))
    for layer in layers:
        layer.compile(dynamic=False)
    _COMPILED_MODELS.add(model)
