"""Pattern attention as SDPA calls over strided views (the default on CUDA).

The same decomposition as ``chunked.py`` (every head rule as causal or plain
SDPA calls over chunks or residue classes), but each call reads q, k and v
through strided *views* of the ``[B, N, H, D]`` tensors that transformers hands
over, instead of copies: chunks are a reshape of the position axis, a residue
class is every r-th position, a head group is a slice of the head axis. Each
output element is written once, straight into a ``[B, N, H, D]`` buffer, so the
transpose that follows attention in transformers is free.

Independent calls (head groups, segments, residue classes) are spread over a
few CUDA streams, so that the many small kernels of a short window overlap
instead of each leaving most of the GPU idle.

A head group that splits a key/value head (9 query heads over 3 key/value
heads in two groups) reads a copy of its key/value heads, one per query head.
Where a view is impossible (a length that is not a multiple of the rate) that
head group falls back to ``chunked_pattern_attention``. Where a view cannot
merge the batch with the chunks (a batch above 1 and a run of chunks shorter
than the window: ``cross``, ``shifted``, a last partial chunk) reshape copies
that run.
"""

from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn.functional as F

from ..patterns.rules import Rule
from ..patterns.spec import PatternSpec
from .chunked import (chunk_and_head_groups, chunked_pattern_attention, grad_in_output_layout, kv_heads_for_queries,
                      query_heads_per_kv)


def _sdpa(q, k, v, causal: bool, scaling: float):
    """SDPA over [batch, L, h, D] views; returns [batch, L, h, D]."""
    gqa = {"enable_gqa": True} if q.shape[2] != k.shape[2] else {}
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, scale=scaling, **gqa)
    return grad_in_output_layout(out).transpose(1, 2)


_STREAMS: dict[int, list] = {}
STREAMS = 4  # side streams per device that independent calls are spread over


class _Launcher:
    """Runs independent calls on a few CUDA streams, so that small kernels overlap.

    Each call writes its own slice of the output. On CPU, with width 1 or while
    torch.compile traces, the calls simply run in order. ``join`` makes the caller's stream wait for all.
    """

    def __init__(self, device: torch.device, width: int):
        self.streams = []
        # Under torch.compile the compiled graph schedules the kernels itself, and torch cannot
        # trace writes into an input made on a side stream: run in order there.
        if device.type == "cuda" and width > 1 and not torch.compiler.is_compiling():
            pool = _STREAMS.setdefault(device.index or 0, [])
            while len(pool) < width:
                pool.append(torch.cuda.Stream(device))
            self.main = torch.cuda.current_stream(device)
            self.streams = pool[:width]
        self.count = 0

    def __call__(self, work) -> None:
        if not self.streams:
            work()
            return
        stream = self.streams[self.count % len(self.streams)]
        if self.count < len(self.streams):
            stream.wait_stream(self.main)  # inputs and the output buffer are ready
        self.count += 1
        with torch.cuda.stream(stream):
            work()

    def join(self) -> None:
        for stream in self.streams[:self.count]:
            self.main.wait_stream(stream)


def strided_pattern_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: PatternSpec,
                              scaling: float, streams: int = STREAMS) -> torch.Tensor:
    """Attention of ``spec`` for q [B, H, N, D], k, v [B, H_kv, N, D] -> [B, H, N, D] ([B, N, H, D] in memory).

    The result is a transposed view of a contiguous [B, N, H, D] buffer, so
    ``out.transpose(1, 2)`` is contiguous without a copy.
    streams: CUDA streams the independent SDPA calls are spread over (1: in order).
    """
    batch, heads, n, _ = q.shape
    per_kv = query_heads_per_kv(q, k)
    chunk, head_groups = chunk_and_head_groups(spec, n, heads)
    qn, kn, vn = (x.transpose(1, 2) for x in (q, k, v))  # [B, N, h, D] views
    out = q.new_empty(batch, n, heads, v.shape[-1])
    # A head group that splits a key/value head gets its own copy of the K/V heads it reads, one
    # per query head. The copies are made before any call is queued on a side stream (each
    # stream waits for the main one once, at its first call) and kept until the join.
    groups = []
    for first, end, rule in head_groups:
        if first % per_kv or end % per_kv:
            gk, gv = (kv_heads_for_queries(x, first, end, per_kv, 2) for x in (kn, vn))
        else:
            gk, gv = (x[:, :, first // per_kv:end // per_kv] for x in (kn, vn))
        groups.append((first, end, rule, gk, gv))
    launch = _Launcher(q.device, streams)
    for first, end, rule, gk, gv in groups:
        gq = qn[:, :, first:end]
        o = out[:, :, first:end]
        if not _rule_views(rule, gq, gk, gv, o, chunk, scaling, launch):
            def work(gq=gq, gk=gk, gv=gv, rule=rule, first=first, end=end):
                out[:, :, first:end] = chunked_pattern_attention(
                    gq.transpose(1, 2), gk.transpose(1, 2), gv.transpose(1, 2), _single(rule, spec),
                    scaling).transpose(1, 2)
            launch(work)
    launch.join()
    return out.transpose(1, 2)


def _single(rule: Rule, spec: PatternSpec) -> PatternSpec:
    """``spec`` reduced to one rule for every head (the chunk size stays ``spec``'s)."""
    return PatternSpec("one", ((Fraction(1), rule),), chunk_size=spec.chunk_size, chunk_ratio=spec.chunk_ratio)


def _chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """[B, L, h, D] with L a multiple of chunk -> [B * L/chunk, chunk, h, D].

    A view for a whole window (or B = 1); reshape copies only where no view exists.
    """
    b, length, h, d = x.shape
    return x.reshape(b * (length // chunk), chunk, h, d)


def _attend(launch, o, q, k, v, causal: bool, scaling: float, chunk: int | None = None) -> None:
    """o = SDPA(q, k, v) over [B, L, h, D] views, batched over chunks of ``chunk`` when given."""
    def work():
        if chunk is None:
            o.copy_(_sdpa(q, k, v, causal, scaling))
        else:
            res = _sdpa(_chunks(q, chunk), _chunks(k, chunk), _chunks(v, chunk), causal, scaling)
            o.copy_(res.reshape(o.shape))
    launch(work)


def _local(launch, o, q, k, v, chunk: int, scaling: float) -> None:
    """Causal attention within consecutive chunks (the last may be shorter), [B, L, h, D] views."""
    length = q.shape[1]
    whole = length // chunk * chunk
    if whole:
        _attend(launch, o[:, :whole], q[:, :whole], k[:, :whole], v[:, :whole], True, scaling, chunk)
    if whole < length:
        _attend(launch, o[:, whole:], q[:, whole:], k[:, whole:], v[:, whole:], True, scaling)


def _rule_views(rule, q, k, v, o, chunk: int, scaling: float, launch) -> bool:
    """Queue the rule's attention into o; False when no view-only layout applies."""
    n = q.shape[1]
    if rule.kind == "causal":
        _attend(launch, o, q, k, v, True, scaling)
        return True
    if rule.kind == "local" or (rule.kind == "cross" and rule.distance == 0):
        _local(launch, o, q, k, v, chunk, scaling)
        return True
    if rule.kind == "shifted":
        head = min(n, chunk - rule.shift_for(chunk) % chunk)
        if head == chunk:  # a shift of whole chunks is no shift
            _local(launch, o, q, k, v, chunk, scaling)
            return True
        _attend(launch, o[:, :head], q[:, :head], k[:, :head], v[:, :head], True, scaling)
        _local(launch, o[:, head:], q[:, head:], k[:, head:], v[:, head:], chunk, scaling)
        return True
    if rule.kind == "cross":
        d = rule.distance
        start = min(n, d * chunk)
        # the first d chunks have no chunk d steps back: local
        _local(launch, o[:, :start], q[:, :start], k[:, :start], v[:, :start], chunk, scaling)
        whole = start + (n - start) // chunk * chunk  # query chunks of full length
        if whole > start:
            keys = slice(0, whole - start)
            _attend(launch, o[:, start:whole], q[:, start:whole], k[:, keys], v[:, keys], False, scaling, chunk)
        if whole < n:  # a shorter last chunk sees all of its chunk d steps back
            keys = slice(whole - start, whole - start + chunk)
            _attend(launch, o[:, whole:], q[:, whole:], k[:, keys], v[:, keys], False, scaling)
        return True
    return _dilated(rule.rate, rule.offset, q, k, v, o, scaling, launch)


def _dilated(r: int, j: int, q, k, v, o, scaling: float, launch) -> bool:
    """dilated(r, j): residue class a (positions a, a + r, ...) sees class (a - j) mod r.

    Classes a >= j see class a - j causally; classes a < j see class a - j + r
    strictly earlier (causal with the queries one step ahead), and their first
    query attends itself. Each of the two is one SDPA call with the classes as
    its batch: class c of a [N, h, D] view is a view of every r-th row.
    """
    n = q.shape[1]
    if n % r or not 0 <= j < r:
        return False
    per_kv = q.shape[2] // k.shape[2]
    for b in range(q.shape[0]):
        # [N, h, D] -> [N/r, r, h, D]; [:, a0:a1] are classes a0..a1-1, moved to the front as the batch
        qc, kc, vc, oc = (x[b].unflatten(0, (n // r, r)) for x in (q, k, v, o))

        def classes(x, rows, first, last):
            return x[rows, first:last].transpose(0, 1)  # [classes, N/r, h, D]

        every = slice(None)
        _attend(launch, classes(oc, every, j, r), classes(qc, every, j, r), classes(kc, every, 0, r - j),
                classes(vc, every, 0, r - j), True, scaling)
        if j:
            if n // r > 1:
                _attend(launch, classes(oc, slice(1, None), 0, j), classes(qc, slice(1, None), 0, j),
                        classes(kc, slice(None, -1), r - j, r), classes(vc, slice(None, -1), r - j, r),
                        True, scaling)
            first_rows = oc[0, :j]
            launch(lambda first_rows=first_rows, vc=vc: first_rows.copy_(
                vc[0, :j].repeat_interleave(per_kv, dim=1)))
    return True
