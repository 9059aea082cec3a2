"""Run evaluation windows through a model and sum the NLL of the scored tokens.

The model's decoder runs on a batch of equal-length windows; the loss is then
computed only at the scored positions, a chunk of positions at a time, so the
full ``[batch, ctx, vocab]`` logits (let alone their fp32 copy) never exist.
Windows of different lengths are never padded into one batch: a pattern's
chunk size depends on the length the layer sees, and padding would change it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError
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


def auto_batch_size(ctx: int, device: torch.device) -> int:
    budget = AUTO_BATCH_TOKENS.get(device.type, AUTO_BATCH_TOKENS["cpu"])
    return max(1, min(64, budget // ctx))


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def plan_batches(windows: Sequence[Window], batch_size: int) -> list[list[int]]:
    """How ``score_windows`` cuts ``windows`` into batches (window indices per batch):
    grouped by length (first-seen order), then cut into runs of ``batch_size``."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, window in enumerate(windows):
        by_length[window.end - window.start].append(index)
    return [
        indices[i : i + batch_size]
        for indices in by_length.values()
        for i in range(0, len(indices), batch_size)
    ]


class _LogitHead:
    """Final norm output → log-probabilities of the targets, for a few rows at a time."""

    def __init__(self, model: torch.nn.Module):
        self.head = model.get_output_embeddings()
        if self.head is None:
            raise UserError(f"{type(model).__name__} has no language-model head; give a causal LM")
        config = model.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        if getattr(config, "logit_scale", None) not in (None, 1, 1.0):
            raise UserError(
                f"{type(model).__name__} scales its logits (logit_scale); this architecture is not supported"
            )

    def nll(self, hidden_rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden_rows).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return F.cross_entropy(logits, targets, reduction="none")


@torch.inference_mode()
def score_windows(
    model: torch.nn.Module,
    documents: Sequence[np.ndarray],
    windows: Sequence[Window],
    *,
    batch_size: int | None = None,
    loss_chunk: int = 1024,
    progress: Callable[[int], None] | None = None,
) -> WindowScores:
    """NLL sums of every window's scored targets.

    ``documents[w.doc][w.start:w.end]`` is fed for window ``w``; targets at
    indices ``w.score_from .. w.end - 1`` are scored, each predicted by the
    hidden state one position before it. ``progress(n)`` is called with the
    number of targets scored after each batch.
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
        batch_size = auto_batch_size(max(w.end - w.start for w in windows), device)

    for batch in plan_batches(windows, batch_size):
        rows = [windows[i] for i in batch]
        ids = torch.from_numpy(np.stack([documents[w.doc][w.start : w.end] for w in rows]).astype(np.int64))
        if device.type == "cuda":
            ids = ids.pin_memory()
        input_ids = ids.to(device, non_blocking=True)
        hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        # With a device map the last layers (and the head) may sit on another device.
        out_device = hidden.device

        # Flat (row, position) pairs of every scored target in the batch.
        row_index, position, window_of_pair = [], [], []
        for row, (index, w) in enumerate(zip(batch, rows)):
            first = w.score_from - w.start - 1  # hidden position that predicts score_from
            count = w.end - w.score_from
            row_index.append(np.full(count, row))
            position.append(np.arange(first, first + count))
            window_of_pair.append(np.full(count, index))
            tokens[index] = count
        row_index = torch.from_numpy(np.concatenate(row_index)).to(out_device, non_blocking=True)
        position = torch.from_numpy(np.concatenate(position)).to(out_device, non_blocking=True)
        window_of_pair = torch.from_numpy(np.concatenate(window_of_pair)).to(device, non_blocking=True)
        targets = input_ids.to(out_device)[row_index, position + 1]

        for begin in range(0, len(targets), loss_chunk):
            end = begin + loss_chunk
            rows_h = hidden[row_index[begin:end], position[begin:end]]
            nll = head.nll(rows_h, targets[begin:end]).double().to(device)
            nll_sum.index_add_(0, window_of_pair[begin:end], nll)
        if progress is not None:
            progress(int(len(targets)))
    return WindowScores(nll_sum.cpu().numpy(), tokens)


def compile_decoder_layers(model: torch.nn.Module) -> None:
    """Compile each decoder layer in place (``nn.Module.compile``), so that the
    elementwise work around the matrix products (RMSNorm, RoPE, SiLU·mul,
    residual adds) runs as fused kernels. Layers share one compiled graph, so
    the cost is one compilation per window length."""
    layers = model.get_decoder().layers
    # Each layer is its own module, so each may need its own entry in dynamo's cache:
    # allow one per layer (the default limit of 8 would leave deep models half eager).
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 2 * len(layers)))
    for layer in layers:
        layer.compile(dynamic=False)
