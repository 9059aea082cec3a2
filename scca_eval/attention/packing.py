"""A pattern's attention as segments of variable-length attention (the packed layout).

Under every head rule of docs/patterns.md, each query attends one run of keys that can
be laid out contiguously, so that a whole layer — every head, every window of the batch —
becomes segments of *one* variable-length attention call (FlashAttention's varlen
kernel), with the heads folded into the token axis:

- ``causal``:  one causal segment of the whole window.
- ``local`` (and ``cross(0)``): one causal segment per chunk (the last may be shorter).
- ``shifted(G, s)``: one causal segment per shifted chunk, ``(p + s) // G`` equal;
  LongLoRA's S2 halves are both plain causal segments, so they share the call.
- ``cross(G, d)``: the first ``d`` chunks fall back to ``local`` (causal segments); query
  chunk ``c >= d`` sees *every* key of chunk ``c - d`` and nothing else, a non-causal
  segment (queries and keys of different lengths where the last chunk is short).
- ``dilated(r, j)``: query residue class ``a`` (positions ``a, a + r, …``) sees key class
  ``b = (a - j) mod r``. For ``a >= j`` its m-th query sees the first ``m + 1`` keys of
  class ``b``: causal, with as many keys as queries. For ``a < j`` its m-th query sees the
  first ``m`` keys (strictly causal): a causal segment of queries ``1, 2, …`` against keys
  ``0, 1, …``; its first query (``q < j``) has no key and attends itself, a one-token
  segment.

So no query ever needs keys from two segments, and no two partial results have to be
merged: the causal segments form one call and the non-causal ones (only ``cross``
needs them) a second. Every causal segment has as many keys as queries, so the
kernel's causal alignment (bottom-right in FlashAttention) is the top-left one meant
here. :func:`build_plan` checks that the segments hold every query exactly once.

A plan is a few index tensors on the device, built once per (pattern, length, heads,
key/value heads, batch, device) and cached: the rows of the queries and keys of each
call in the flattened ``[B, N, H, D]`` token layout, ``cu_seqlens``, the longest segment
(plain ints, so the forward needs no host sync), and the permutation that puts the
outputs back in order.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..patterns.rules import Rule
from ..patterns.spec import PatternSpec

# Cached plans; one for 32 heads at 32k holds about 3 x 8 MB of indices.
_PLAN_CACHE_SIZE = 32


@dataclass(frozen=True)
class Segments:
    """Segments of one head rule over positions 0..n-1 (one head, one window).

    q_pos, k_pos: LongTensors of positions, segment after segment.
    q_len, k_len: LongTensors, the length of each segment (>= 1).
    """

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    q_len: torch.Tensor
    k_len: torch.Tensor

    @staticmethod
    def empty() -> "Segments":
        none = torch.zeros(0, dtype=torch.long)
        return Segments(none, none, none, none)

    @staticmethod
    def square(positions: torch.Tensor, lengths: torch.Tensor) -> "Segments":
        """Segments whose keys are their queries (causal self-attention runs)."""
        return Segments(positions, positions, lengths, lengths)

    def __add__(self, other: "Segments") -> "Segments":
        return Segments(*(torch.cat([a, b]) for a, b in zip(
            (self.q_pos, self.k_pos, self.q_len, self.k_len), (other.q_pos, other.k_pos, other.q_len, other.k_len))))

    @property
    def count(self) -> int:
        return len(self.q_len)


def _runs(ids: torch.Tensor) -> torch.Tensor:
    """Lengths of the runs of equal neighbouring values in ``ids`` (sorted ids)."""
    if ids.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.unique_consecutive(ids, return_counts=True)[1]


def _chunks(start: int, end: int, chunk: int, shift: int = 0) -> Segments:
    """Causal segments over positions [start, end), cut where (p + shift) // chunk changes."""
    positions = torch.arange(start, end)
    return Segments.square(positions, _runs((positions + shift) // chunk))


def rule_segments(rule: Rule, n: int, chunk: int) -> tuple[Segments, Segments]:
    """(causal, non-causal) segments of ``rule`` for a window of ``n`` tokens and chunk size ``chunk``.

    In a causal segment query i attends keys 0..i (as many keys as queries); in a
    non-causal one every query attends every key of its segment.
    """
    if rule.kind == "causal":
        return Segments.square(torch.arange(n), torch.tensor([n])), Segments.empty()
    if rule.kind == "local":
        return _chunks(0, n, chunk), Segments.empty()
    if rule.kind == "shifted":
        return _chunks(0, n, chunk, rule.shift_for(chunk)), Segments.empty()
    if rule.kind == "cross":
        return _cross(n, chunk, rule.distance)
    return _dilated(n, rule.rate, rule.offset), Segments.empty()


def _cross(n: int, chunk: int, distance: int) -> tuple[Segments, Segments]:
    chunks = -(-n // chunk)
    if distance == 0 or distance >= chunks:  # no chunk that far back anywhere: local
        return _chunks(0, n, chunk), Segments.empty()
    start = distance * chunk  # queries before it fall back to local
    pairs = chunks - distance  # query chunks distance..chunks-1 see key chunks 0..pairs-1, all complete
    queries = torch.arange(start, n)
    far = Segments(queries, torch.arange(pairs * chunk), _runs(queries // chunk),
                   torch.full((pairs,), chunk, dtype=torch.long))
    return _chunks(0, start, chunk), far


def _dilated(n: int, rate: int, offset: int) -> Segments:
    parts = Segments.empty()
    for a in range(min(rate, n)):
        queries = torch.arange(a, n, rate)
        count = len(queries)
        if a >= offset:  # query m sees keys 0..m of class a - offset
            keys = torch.arange(a - offset, n, rate)[:count]
            parts = parts + Segments(queries, keys, torch.tensor([count]), torch.tensor([count]))
            continue
        # a < offset: query m sees keys 0..m-1 of class a - offset + rate ...
        if count > 1:
            keys = torch.arange(a - offset + rate, n, rate)[:count - 1]
            parts = parts + Segments(queries[1:], keys, torch.tensor([count - 1]), torch.tensor([count - 1]))
        # ... and its first query (q = a < offset) has no such key: it attends itself
        parts = parts + Segments.square(queries[:1], torch.tensor([1]))
    return parts


# -- plans ------------------------------------------------------------------------
@dataclass(frozen=True)
class VarlenCall:
    """One variable-length attention call over rows of the flattened token layouts.

    q_rows: rows of the queries [B * N * H, D] (row (b * N + p) * H + h), segment after segment.
    k_rows: rows of the keys and values [B * N * H_kv, D] for the same segments.
    cu_q, cu_k: int32 [segments + 1], where each segment starts and ends.
    max_q, max_k: the longest segment (plain ints: no host sync in the forward).
    causal: query i of a segment attends its keys 0..i (else all of them).
    """

    q_rows: torch.Tensor
    k_rows: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    causal: bool

    @property
    def segments(self) -> int:
        return len(self.cu_q) - 1


@dataclass(frozen=True)
class PackedPlan:
    """The calls of one layer (causal first) and ``order``: for each query row of the
    flattened layout, its row in the calls' outputs laid end to end."""

    calls: tuple[VarlenCall, ...]
    order: torch.Tensor


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)


def build_plan(spec: PatternSpec, n: int, num_heads: int, kv_heads: int, batch: int,
               device: torch.device | str = "cpu") -> PackedPlan:
    """The packed layout of ``spec`` for ``batch`` windows of ``n`` tokens (no cache)."""
    if num_heads % kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {kv_heads} key/value heads evenly")
    per_kv = num_heads // kv_heads
    chunk = spec.chunk_for(n)
    windows = torch.arange(batch)[:, None, None]
    pieces: dict[bool, list[tuple[torch.Tensor, ...]]] = {True: [], False: []}
    for first, end, rule in spec.head_groups(n, num_heads):
        heads = torch.arange(first, end)[None, :, None]
        for causal, seg in zip((True, False), rule_segments(rule, n, chunk)):
            if seg.count == 0:
                continue
            # windows, then heads, then the rule's segments: [batch, heads, tokens] flattened
            q_rows = (windows * n + seg.q_pos) * num_heads + heads
            k_rows = (windows * n + seg.k_pos) * kv_heads + heads // per_kv
            copies = batch * (end - first)
            pieces[causal].append((q_rows.reshape(-1), k_rows.reshape(-1),
                                   seg.q_len.repeat(copies), seg.k_len.repeat(copies)))
    calls = []
    for causal in (True, False):
        if not pieces[causal]:
            continue
        q_rows, k_rows, q_len, k_len = (torch.cat(parts) for parts in zip(*pieces[causal]))
        if causal and not torch.equal(q_len, k_len):
            raise AssertionError("a causal segment with fewer keys than queries")  # the layout promises equal
        calls.append(VarlenCall(q_rows.to(device), k_rows.to(device), _cumulative(q_len).to(device),
                                _cumulative(k_len).to(device), int(q_len.max()), int(k_len.max()), causal))
    rows = torch.cat([call.q_rows.cpu() for call in calls])
    total = batch * n * num_heads
    if len(rows) != total or not torch.equal(torch.bincount(rows, minlength=total), torch.ones(total, dtype=torch.long)):
        raise AssertionError(f"the packed layout of {spec.canonical()} does not hold every query exactly once")
    order = torch.empty(total, dtype=torch.long)
    order[rows] = torch.arange(total)
    return PackedPlan(tuple(calls), order.to(device))


_plans: OrderedDict = OrderedDict()  # by value: one plan per case, shared by equal specs
_plans_of_spec: OrderedDict = OrderedDict()  # by spec object: the lookup torch.compile traces
_plans_lock = threading.Lock()


def packed_plan(spec: PatternSpec, n: int, num_heads: int, kv_heads: int, batch: int,
                device: torch.device) -> PackedPlan:
    """``build_plan``, cached per (pattern, length, heads, key/value heads, batch, device).

    Looked up first by the spec *object* (a plain read keyed by ``id``, which torch.compile
    traces without a break, where it cannot compare two specs by value), then by value,
    so that equal specs (every attention layer reads its own) share one plan.
    """
    case = (n, num_heads, kv_heads, batch, str(device))
    hit = _plans_of_spec.get((id(spec), *case))
    if hit is not None and hit[0] is spec:
        return hit[1]
    with _plans_lock:
        plan = _plans.get((spec, *case))
    if plan is None:
        plan = build_plan(spec, n, num_heads, kv_heads, batch, device)
    with _plans_lock:
        _plans[(spec, *case)] = plan
        _plans_of_spec[(id(spec), *case)] = (spec, plan)  # holding the spec keeps its id unique
        for cache, size in ((_plans, _PLAN_CACHE_SIZE), (_plans_of_spec, 4 * _PLAN_CACHE_SIZE)):
            while len(cache) > size:  # the oldest goes first
                cache.popitem(last=False)
    return plan


def clear_cache() -> None:
    """Forget every cached plan (e.g. between benchmark runs)."""
    with _plans_lock:
        _plans.clear()
        _plans_of_spec.clear()
