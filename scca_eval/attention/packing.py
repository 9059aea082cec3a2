"""A pattern's attention as segments of variable-length attention (the packed layout).

Under every head rule of docs/patterns.md, each query attends one run of keys that can
be laid out contiguously, so that a whole layer — every head, every window of the batch —
becomes segments of *one* variable-length attention call (FlashAttention's varlen
kernel), with the heads folded into the token axis: window after window, head after head,
each head's rows one after the other.

The rows of a head are its positions in order, so that its segments are runs of rows and
the layout is built by strided copies (transposes), never by gathering rows one by one:

- ``causal``:  one causal segment of the whole window.
- ``local`` (and ``cross(0)``): one causal segment per chunk (the last may be shorter).
- ``shifted(G, s)``: one causal segment per shifted chunk, ``(p + s) // G`` equal;
  LongLoRA's S2 halves are both plain causal segments, so they share the call.
- ``cross(G, d)``: the first ``d`` chunks are ``local`` (causal segments). Query chunk
  ``c >= d`` sees *every* key of chunk ``c - d`` and nothing else: a non-causal segment
  of a second call (queries and keys of different lengths where the last chunk is
  short). In the first call those queries still hold their rows, cut into short
  segments (``WASTE_RUN``) whose outputs are replaced by the second call's.
- ``dilated(r, j)``: the head's rows are its residue classes mod ``r`` one after the
  other (positions ``a, a + r, …``), each padded at its end to ``L = ceil(N / r)`` rows.
  Query class ``a`` sees key class ``b = (a - j) mod r``, so the keys are laid out class
  by class in that order. For ``a >= j`` the m-th query sees the first ``m + 1`` keys of
  class ``b``: one causal segment. For ``a < j`` it sees the first ``m`` keys (strictly
  causal): the key rows of class ``a`` are the query's own key (row 0) followed by class
  ``b``'s first ``L - 1``, and two causal segments, the first query alone (it attends
  itself) and the rest. Padding rows come after every real row of their segment, so
  causality keeps them out of every real query's keys.

So no query needs keys from two segments, and no two partial results are merged: the
causal segments form one call and the non-causal ones (only ``cross`` needs them) a
second. Every causal segment has as many keys as queries, so the kernel's causal
alignment (bottom-right in FlashAttention) is the top-left one meant here.

A plan is built once per (pattern, length, heads, key/value heads, batch, device) and
cached: how the heads are laid out, ``cu_seqlens`` on the device, the longest segment
(plain ints, so the forward needs no host sync). :func:`build_plan` lays out the *row
numbers* of the queries and keys with the same functions the forward uses, and checks
that the segments hold every query exactly once; ``build_plan`` keeps the row numbers in
the plan (on the host) for tests, the cached plans the forward uses drop them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..patterns.rules import Rule
from ..patterns.spec import PatternSpec
from .plan_cache import PlanCache

# Segment length for the rows of a cross head's far queries in the causal call: their
# outputs are replaced, so the segments are kept short (one FlashAttention tile).
WASTE_RUN = 128


# -- one head --------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadLayout:
    """How one head rule lays out a window of ``n`` tokens.

    rate, offset: rows are residue classes mod ``rate`` (padded to ``rate * ceil(n / rate)``
        rows), key classes taken ``offset`` classes back; rate 1: the positions in order.
    causal: segment lengths over the head's rows in the causal call (they sum to its rows).
    discarded: which of those segments only hold rows whose output the non-causal call
        replaces (a cross head's far queries).
    reach: ``(start, query_lengths, key_lengths)`` of a cross head's non-causal call:
        queries ``start..n-1`` against keys ``0..sum(key_lengths)-1``; None without one.
    """

    rate: int
    offset: int
    causal: tuple[int, ...]
    discarded: tuple[bool, ...]
    reach: tuple[int, tuple[int, ...], tuple[int, ...]] | None = None

    def rows(self, n: int) -> int:
        return n if self.rate == 1 else self.rate * -(-n // self.rate)


def _runs(n: int, length: int, shift: int = 0) -> tuple[int, ...]:
    """Lengths of the runs of positions 0..n-1 with equal (p + shift) // length."""
    if n == 0:
        return ()
    ids = (torch.arange(n) + shift) // length
    return tuple(torch.unique_consecutive(ids, return_counts=True)[1].tolist())


def _plain(lengths: tuple[int, ...]) -> HeadLayout:
    return HeadLayout(1, 0, lengths, (False,) * len(lengths))


def head_layout(rule: Rule, n: int, chunk: int) -> HeadLayout:
    """The layout of ``rule`` for a window of ``n`` tokens and chunk size ``chunk``."""
    if rule.kind == "causal" or (rule.kind == "dilated" and rule.rate == 1):
        return _plain((n,))
    if rule.kind == "local":
        return _plain(_runs(n, chunk))
    if rule.kind == "shifted":
        return _plain(_runs(n, chunk, rule.shift_for(chunk)))
    if rule.kind == "cross":
        chunks = -(-n // chunk)
        if rule.distance == 0 or rule.distance >= chunks:  # no chunk that far back anywhere: local
            return _plain(_runs(n, chunk))
        start = rule.distance * chunk
        near, far = _runs(start, chunk), _runs(n - start, WASTE_RUN)
        queries = _runs(n - start, chunk)  # start is a chunk border
        return HeadLayout(1, 0, near + far, (False,) * len(near) + (True,) * len(far),
                          (start, queries, (chunk,) * len(queries)))
    rate, offset = rule.rate, rule.offset
    per_class = -(-n // rate)
    lengths: list[int] = []
    for a in range(rate):
        lengths += [per_class] if a >= offset or per_class == 1 else [1, per_class - 1]
    return HeadLayout(rate, offset, tuple(lengths), (False,) * len(lengths))


# -- a layer: pieces of heads laid out alike ---------------------------------------------
@dataclass(frozen=True)
class Piece:
    """Query heads ``first..end-1``, laid out alike (same rate and offset), at rows
    ``start..start + (end - first) * rows - 1`` of each window's block in the causal call."""

    first: int
    end: int
    rate: int
    offset: int
    rows: int  # per head
    start: int

    @property
    def heads(self) -> int:
        return self.end - self.first


@dataclass(frozen=True)
class Reach:
    """Query heads ``first..end-1`` of a cross rule: queries ``query_start..n-1`` against keys
    ``0..keys-1`` in the non-causal call, at query rows ``q_at`` and key rows ``k_at`` of each
    window's block there."""

    first: int
    end: int
    query_start: int
    keys: int
    q_at: int
    k_at: int


@dataclass(frozen=True)
class VarlenCall:
    """One variable-length attention call.

    cu_q, cu_k: int32 [segments + 1] on the device, where each segment starts and ends.
    max_q, max_k: the longest segment (plain ints: no host sync in the forward).
    causal: query i of a segment attends its keys 0..i (else all of them).
    q_rows, k_rows: (host) for each packed row, the row of the flattened ``[B, N, H, D]``
        queries (``[B, N, H_kv, D]`` keys) it holds, -1 for padding; empty in cached plans.
    kept: (host) per segment, whether its outputs are used.
    """

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    causal: bool
    q_rows: torch.Tensor
    k_rows: torch.Tensor
    kept: torch.Tensor

    @property
    def segments(self) -> int:
        return len(self.cu_q) - 1


@dataclass(frozen=True)
class PackedPlan:
    """The layout of one layer: ``n`` tokens, ``heads`` query heads sharing ``kv_heads``,
    ``batch`` windows; the causal call's pieces (``block`` rows per window) and the
    non-causal call's reaches (``reach_q``/``reach_k`` rows per window), and the calls."""

    n: int
    heads: int
    kv_heads: int
    batch: int
    pieces: tuple[Piece, ...]
    block: int
    reaches: tuple[Reach, ...]
    reach_q: int
    reach_k: int
    calls: tuple[VarlenCall, ...]

    @property
    def per_kv(self) -> int:
        return self.heads // self.kv_heads


# -- the layout, for values and for row numbers alike ----------------------------------
# Built from split, reshape and cat only, so that autograd's backward is the same few
# strided copies run the other way (split's gradient is one cat, cat's is views).
def expand_kv_heads(x: torch.Tensor, per: int) -> torch.Tensor:
    """x [B, H_kv, N, D] -> [B, H_kv * per, N, D]: each key/value head repeated for its query heads."""
    if per == 1:
        return x
    return x.unsqueeze(2).expand(-1, -1, per, -1, -1).flatten(1, 2)


def _classes(x: torch.Tensor, rate: int, pad: float) -> torch.Tensor:
    """[B, h, N, D] -> [B, h, rate, L, D]: residue class a is positions a, a + rate, …, padded to L rows."""
    n = x.shape[2]
    per_class = -(-n // rate)
    if per_class * rate > n:
        x = F.pad(x, (0, 0, 0, per_class * rate - n), value=pad)
    return x.unflatten(2, (per_class, rate)).transpose(2, 3)


def _key_classes(x: torch.Tensor, rate: int, offset: int, pad: float) -> torch.Tensor:
    """[B, h, N, D] -> [B, h, rate, L, D]: for query class a, the keys its segments read."""
    classes = _classes(x, rate, pad)
    if offset == 0:
        return classes
    per_class = classes.shape[3]
    # query class a < j: its own first key, then key class a - j + r; a >= j: key class a - j
    early = torch.cat([classes[:, :, :offset, :1], classes[:, :, rate - offset:, :per_class - 1]], dim=3)
    return torch.cat([early, classes[:, :, :rate - offset]], dim=2)


def _rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """[B, h_i, …, D] parts -> their rows window by window, [B * sum(rows), D]."""
    flat = [part.reshape(part.shape[0], -1, part.shape[-1]) for part in parts]
    packed = flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)
    return packed.reshape(-1, packed.shape[-1])


def pack_queries(plan: PackedPlan, q: torch.Tensor, pad: float = 0) -> torch.Tensor:
    """q [B, H, N, D] (any strides) -> the causal call's queries [B * block, D]."""
    parts = q.split([piece.heads for piece in plan.pieces], dim=1)
    return _rows([part if piece.rate == 1 else _classes(part, piece.rate, pad)
                  for piece, part in zip(plan.pieces, parts)])


def pack_keys(plan: PackedPlan, keys: torch.Tensor, pad: float = 0) -> torch.Tensor:
    """Keys (or values) per query head, ``expand_kv_heads``' [B, H, N, D] -> the causal call's
    keys [B * block, D], row for row with the queries."""
    parts = keys.split([piece.heads for piece in plan.pieces], dim=1)
    return _rows([part if piece.rate == 1 else _key_classes(part, piece.rate, piece.offset, pad)
                  for piece, part in zip(plan.pieces, parts)])


def _split_at_reaches(plan: PackedPlan, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """x [B, H, N, D] split along the heads where a reach starts or ends: {first head: part},
    in head order."""
    bounds = sorted({0, plan.heads, *(r.first for r in plan.reaches), *(r.end for r in plan.reaches)})
    return dict(zip(bounds, x.split([end - first for first, end in zip(bounds, bounds[1:])], dim=1)))


def pack_reach(plan: PackedPlan, x: torch.Tensor, keys: bool) -> torch.Tensor:
    """The non-causal call's queries (keys=False, x [B, H, N, D]) or keys/values (x from
    ``expand_kv_heads``): [B * reach_q, D] or [B * reach_k, D]."""
    n, parts = plan.n, _split_at_reaches(plan, x)
    rows = []
    for reach in plan.reaches:
        if keys:  # keys 0..keys-1
            rows.append(parts[reach.first].split([reach.keys, n - reach.keys], dim=2)[0])
        else:  # queries query_start..n-1
            rows.append(parts[reach.first].split([reach.query_start, n - reach.query_start], dim=2)[1])
    return _rows(rows)


def unpack(plan: PackedPlan, causal_out: torch.Tensor, reach_out: torch.Tensor | None) -> torch.Tensor:
    """The calls' outputs ([B * block, D], [B * reach_q, D]) -> [B, H, N, D], laid out [B, N, H, D] in memory."""
    batch, n, dim = plan.batch, plan.n, causal_out.shape[-1]
    blocks = causal_out.view(batch, plan.block, dim).split([p.heads * p.rows for p in plan.pieces], dim=1)
    heads = []  # [B, h, N, D] per piece, in head order
    for piece, block in zip(plan.pieces, blocks):
        block = block.unflatten(1, (piece.heads, piece.rows))
        if piece.rate > 1:
            block = block.unflatten(2, (piece.rate, piece.rows // piece.rate)).transpose(2, 3).flatten(2, 3)[:, :, :n]
        heads.append(block)
    if reach_out is not None:  # the far queries of cross heads: the non-causal call's outputs replace the first's
        whole = torch.cat(heads, dim=1) if len(heads) > 1 else heads[0]
        parts = _split_at_reaches(plan, whole)
        far = reach_out.view(batch, plan.reach_q, dim).split(
            [(r.end - r.first) * (n - r.query_start) for r in plan.reaches], dim=1)
        for reach, rows in zip(plan.reaches, far):
            near = parts[reach.first].split([reach.query_start, n - reach.query_start], dim=2)[0]
            parts[reach.first] = torch.cat([near, rows.unflatten(1, (reach.end - reach.first, n - reach.query_start))],
                                           dim=2)
        heads = list(parts.values())
    if len(heads) == 1:
        return heads[0].transpose(1, 2).contiguous().transpose(1, 2)
    return torch.cat([part.transpose(1, 2) for part in heads], dim=2).transpose(1, 2)


# -- plans ------------------------------------------------------------------------------
def _cumulative(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.long).cumsum(0).to(torch.int32)


def build_plan(spec: PatternSpec, n: int, num_heads: int, kv_heads: int, batch: int,
               device: torch.device | str = "cpu", keep_rows: bool = True) -> PackedPlan:
    """The packed layout of ``spec`` for ``batch`` windows of ``n`` tokens (no cache).

    keep_rows: keep each call's row numbers (for tests; the forward never reads them, and at
    long lengths they take tens of MB of host memory per plan).
    """
    if num_heads % kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {kv_heads} key/value heads evenly")
    chunk = spec.chunk_for(n)
    layouts = [head_layout(rule, n, chunk) for rule in spec.head_rules(n, num_heads)]
    pieces: list[Piece] = []
    block = 0
    for head, layout in enumerate(layouts):
        last = pieces[-1] if pieces else None
        if last is not None and (last.rate, last.offset) == (layout.rate, layout.offset):
            pieces[-1] = Piece(last.first, head + 1, last.rate, last.offset, last.rows, last.start)
        else:
            pieces.append(Piece(head, head + 1, layout.rate, layout.offset, layout.rows(n), block))
        block += layout.rows(n)
    reaches: list[Reach] = []
    reach_q = reach_k = 0
    for head, layout in enumerate(layouts):
        if layout.reach is None:
            continue
        start, _, key_lengths = layout.reach
        last = reaches[-1] if reaches else None
        if last is not None and last.end == head and last.query_start == start:
            reaches[-1] = Reach(last.first, head + 1, start, last.keys, last.q_at, last.k_at)
        else:
            reaches.append(Reach(head, head + 1, start, sum(key_lengths), reach_q, reach_k))
        reach_q += n - start
        reach_k += sum(key_lengths)
    plan = PackedPlan(n, num_heads, kv_heads, batch, tuple(pieces), block, tuple(reaches), reach_q, reach_k, ())

    # The row numbers of queries and keys, laid out by the forward's own functions.
    q_ids = torch.arange(batch * n * num_heads).view(batch, n, num_heads, 1).transpose(1, 2)
    k_ids = torch.arange(batch * n * kv_heads).view(batch, n, kv_heads, 1).transpose(1, 2)
    causal = [length for layout in layouts for length in layout.causal] * batch
    kept = [not waste for layout in layouts for waste in layout.discarded] * batch
    k_ids = expand_kv_heads(k_ids, num_heads // kv_heads)
    calls = [_call(causal, causal, True, pack_queries(plan, q_ids, -1), pack_keys(plan, k_ids, -1), kept, device)]
    if reaches:
        q_lengths = [length for layout in layouts if layout.reach for length in layout.reach[1]] * batch
        k_lengths = [length for layout in layouts if layout.reach for length in layout.reach[2]] * batch
        calls.append(_call(q_lengths, k_lengths, False, pack_reach(plan, q_ids, False),
                           pack_reach(plan, k_ids, True), [True] * len(q_lengths), device))
    plan = dataclasses.replace(plan, calls=tuple(calls))
    _check_every_query_once(plan, spec)
    if not keep_rows:
        none = torch.zeros(0, dtype=torch.long)
        plan = dataclasses.replace(plan, calls=tuple(dataclasses.replace(call, q_rows=none, k_rows=none)
                                                     for call in plan.calls))
    return plan


def _call(q_lengths: list[int], k_lengths: list[int], causal: bool, q_rows: torch.Tensor, k_rows: torch.Tensor,
          kept: list[bool], device) -> VarlenCall:
    if causal and q_lengths != k_lengths:
        raise AssertionError("a causal segment with fewer keys than queries")  # the layout promises equal
    cu_q, cu_k = _cumulative(q_lengths), _cumulative(k_lengths)
    if int(cu_q[-1]) != len(q_rows) or int(cu_k[-1]) != len(k_rows):
        raise AssertionError("the segments do not cover the packed rows")
    return VarlenCall(cu_q.to(device), cu_k.to(device), max(q_lengths), max(k_lengths), causal,
                      q_rows.view(-1), k_rows.view(-1), torch.tensor(kept, dtype=torch.bool))


def _check_every_query_once(plan: PackedPlan, spec: PatternSpec) -> None:
    rows = []
    for call in plan.calls:
        cu = call.cu_q.cpu().long()
        segment_of_row = torch.repeat_interleave(torch.arange(call.segments), cu[1:] - cu[:-1])
        used = call.q_rows[call.kept[segment_of_row]]
        rows.append(used[used >= 0])
    rows = torch.cat(rows)
    total = plan.batch * plan.n * plan.heads
    if len(rows) != total or not torch.equal(torch.bincount(rows, minlength=total), torch.ones(total, dtype=torch.long)):
        raise AssertionError(f"the packed layout of {spec.canonical()} does not hold every query exactly once")


def _build_cached(spec: PatternSpec, n: int, num_heads: int, kv_heads: int, batch: int, device: str) -> PackedPlan:
    return build_plan(spec, n, num_heads, kv_heads, batch, device, keep_rows=False)


_plans: PlanCache[PackedPlan] = PlanCache(_build_cached)


def packed_plan(spec: PatternSpec, n: int, num_heads: int, kv_heads: int, batch: int,
                device: torch.device) -> PackedPlan:
    """``build_plan``, cached per (pattern, length, heads, key/value heads, batch, device);
    equal specs share one plan, and compiled code reads it without a graph break (plan_cache.py)."""
    return _plans.get(spec, n, num_heads, kv_heads, batch, str(device))


def clear_cache() -> None:
    """Forget every cached plan (e.g. between benchmark runs)."""
    _plans.clear()
