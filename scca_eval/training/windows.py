"""Training windows: the documents as one token stream, cut into ctx-token windows.

As LongLoRA's ``fine-tune.py`` does, the documents are joined into one stream with the
tokenizer's EOS token after each (so a window may hold the end of one document and the
start of the next, and learns that EOS separates them), and the stream is cut into
disjoint windows of ``ctx`` tokens. Unlike LongLoRA, the stream's tail shorter than
``ctx`` is dropped instead of padded, so every window is all text. Each window trains on
its ``ctx - 1`` next-token targets.

The order is seeded: pass ``e`` over the data (an epoch) visits the windows in the
permutation ``numpy.random.default_rng([seed, e])`` gives, so the ``k``-th window of a
run depends on ``(seed, k)`` alone, and a resumed run needs only ``k`` to continue.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ..data import TokenizedTask
from ..errors import UserError


@dataclass
class TrainingStream:
    """The joined token stream and what it was made of."""

    ids: np.ndarray  # int64
    ctx: int
    eos_id: int | None
    tasks: list[dict] = field(default_factory=list)  # per task: name, data fingerprint, document ids
    fingerprint: str = ""

    @property
    def windows(self) -> int:
        return len(self.ids) // self.ctx

    def window(self, index: int) -> np.ndarray:
        return self.ids[index * self.ctx : (index + 1) * self.ctx]

    def describe(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "tokens": int(len(self.ids)),
            "windows": self.windows,
            "separator_eos_id": self.eos_id,
            "tasks": self.tasks,
        }


def build_stream(tokenized: list[TokenizedTask], eos_id: int | None, ctx: int) -> TrainingStream:
    """Join every document of every task (in order) with ``eos_id`` after each."""
    parts: list[np.ndarray] = []
    digest = hashlib.sha256(f"eos={eos_id}".encode())
    tasks = []
    for task in tokenized:
        for doc in task.docs:
            parts.append(np.asarray(doc.ids, dtype=np.int64))
            if eos_id is not None:
                parts.append(np.array([eos_id], dtype=np.int64))
        digest.update(f"|{task.data_fingerprint}|{task.tokenizer_fingerprint}".encode())
        tasks.append({"name": task.task.name, "data_fingerprint": task.data_fingerprint,
                      "tokenizer_fingerprint": task.tokenizer_fingerprint,
                      "documents": [doc.id for doc in task.docs], "tokens": task.tokens})
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    stream = TrainingStream(ids, ctx, eos_id, tasks, "sha256:" + digest.hexdigest())
    if stream.windows < 1:
        names = ", ".join(t["name"] for t in tasks) or "the data"
        raise UserError(f"{names} holds {len(ids)} tokens, fewer than one training window of ctx {ctx}: "
                        "give more data (--data / --task) or a smaller --ctx")
    return stream


def window_index(seed: int, position: int, n_windows: int) -> int:
    """The window the run trains on at ``position`` (0, 1, 2, … over the whole run)."""
    epoch, offset = divmod(position, n_windows)
    return int(_permutation(seed, epoch, n_windows)[offset])


_cache: dict[tuple[int, int, int], np.ndarray] = {}


def _permutation(seed: int, epoch: int, n_windows: int) -> np.ndarray:
    key = (seed, epoch, n_windows)
    if key not in _cache:
        _cache.clear()  # one epoch at a time is all a run needs
        _cache[key] = np.random.default_rng([seed, epoch]).permutation(n_windows)
    return _cache[key]


def batch_ids(stream: TrainingStream, seed: int, first_position: int, count: int) -> np.ndarray:
    """``count`` windows from ``first_position`` on, stacked: ``[count, ctx]`` int64."""
    return np.stack([stream.window(window_index(seed, first_position + i, stream.windows)) for i in range(count)])
