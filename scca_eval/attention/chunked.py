"""Pattern attention in plain torch, on any device, without an [N, N] mask.

Every head rule of docs/patterns.md is rewritten as ordinary attention over
blocks, so that it runs through ``scaled_dot_product_attention`` (or any other
kernel with the same contract, see ``BlockAttention``):

- ``causal``:  one causal call over the whole window.
- ``local``:   the window cut into chunks of G (the last one padded at the end;
  a padded key sits after every real query of its chunk, so causality hides
  it), one causal call per chunk, all chunks in one batch.
- ``shifted``: the borders move by s, so the segments are
  ``[0, G - s)``, then chunks of G: a causal call on the first segment and
  ``local`` on the rest.
- ``cross(d)``: the queries of chunk c attend every key of chunk c - d, all of
  which come earlier, so it is one non-causal call per chunk pair; the first d
  chunks fall back to ``local``.
- ``dilated(r, j)``: positions are reordered by residue (p mod r, then p // r).
  Query class a then sees exactly key class (a - j) mod r, causally when
  a >= j and strictly causally when a < j; strictly causal is causal with the
  queries moved one step forward. A query with no key (q < j) attends itself,
  and attention over one key returns that key's value.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..patterns.rules import Rule
from ..patterns.spec import PatternSpec
from .plan_cache import PlanCache

# kernel(q, k, v, causal, scaling) -> out, all [B, h, L, D] with one length L;
# causal means query i attends keys 0..i.
BlockAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], torch.Tensor]


def sdpa_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scaling: float) -> torch.Tensor:
    return grad_in_output_layout(F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scaling))


def grad_in_output_layout(out: torch.Tensor) -> torch.Tensor:
    """``out``, whose incoming gradient is handed on in ``out``'s own strides.

    The gradient that reaches an SDPA backward takes whatever layout the ops
    after it leave (here: a slice of a transposed, longer gradient, whose
    batch stride differs from the output's). PyTorch's CPU kernel reads any
    layout; the fused CUDA kernels take a gradient that counts as contiguous
    as it is, and gave wrong bf16 gradients for such a slice (strided
    backend, scca_flow, N not a multiple of G). Copying it into the
    output's layout, only where it differs, gives every kernel the layout that
    a plain loss on the output would.
    """
    if not out.requires_grad:
        return out
    if torch.compiler.is_compiling():
        # A hook that branches on the gradient's strides breaks a compiled graph; the
        # traceable way copies every gradient into the output's layout.
        return _GradInOutputLayout.apply(out)
    size, stride = out.shape, out.stride()

    def to_output_layout(grad: torch.Tensor) -> torch.Tensor:
        if grad.stride() == stride:
            return grad
        return torch.empty_strided(size, stride, dtype=grad.dtype, device=grad.device).copy_(grad)

    out.register_hook(to_output_layout)
    return out


class _GradInOutputLayout(torch.autograd.Function):
    """Identity forward; the backward hands on the gradient copied into the output's strides."""

    @staticmethod
    def forward(ctx, out: torch.Tensor) -> torch.Tensor:
        ctx.size, ctx.stride = tuple(out.shape), out.stride()
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(ctx.size, ctx.stride, dtype=grad.dtype, device=grad.device).copy_(grad)


def query_heads_per_kv(q: torch.Tensor, k: torch.Tensor) -> int:
    """Query heads per key/value head, after checking the shapes a pattern layout needs."""
    n, num_heads, kv_heads = q.shape[2], q.shape[1], k.shape[1]
    if k.shape[2] != n:
        raise ValueError(f"pattern attention needs as many keys as queries, got {n} queries and {k.shape[2]} keys")
    if num_heads % kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {kv_heads} key/value heads evenly")
    return num_heads // kv_heads


def kv_heads_for_queries(x: torch.Tensor, first: int, end: int, per_kv: int, dim: int) -> torch.Tensor:
    """The key/value heads (along ``dim``) that query heads [first, end) read, one per query
    head, as a contiguous copy. By expand rather than index_select: no index tensor to build
    on every call, and a backward that sums instead of an atomic scatter-add."""
    kv_first, kv_end = first // per_kv, -(-end // per_kv)
    group = x.narrow(dim, kv_first, kv_end - kv_first).unsqueeze(dim + 1)
    shape = list(group.shape)
    shape[dim + 1] = per_kv
    repeated = group.expand(shape).flatten(dim, dim + 1)
    return repeated.narrow(dim, first - kv_first * per_kv, end - first).contiguous()


def _chunk_and_head_groups(spec: PatternSpec, n: int, num_heads: int) -> tuple[int, tuple]:
    return spec.chunk_for(n), tuple(spec.head_groups(n, num_heads))


_layouts = PlanCache(_chunk_and_head_groups, size=64)


def chunk_and_head_groups(spec: PatternSpec, n: int, num_heads: int) -> tuple[int, tuple]:
    """``spec``'s chunk length at length ``n`` and its head groups ``(first, end, rule)``.

    Cached (plan_cache.py): their arithmetic runs on Fractions, which a compiled layer cannot
    trace, so reading them inside one would break its graph at every call.
    """
    return _layouts.get(spec, n, num_heads)


def chunked_pattern_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: PatternSpec,
                              scaling: float, block_attention: BlockAttention = sdpa_blocks) -> torch.Tensor:
    """Attention of ``spec`` for q [B, H, N, D] and k, v [B, H_kv, N, D] -> [B, H, N, D]."""
    batch, num_heads, n, head_dim = q.shape
    per_kv = query_heads_per_kv(q, k)
    chunk, head_groups = chunk_and_head_groups(spec, n, num_heads)
    out = q.new_empty(batch, num_heads, n, v.shape[-1])
    for first, end, rule in head_groups:
        # The key/value head of each query head in the group (grouped-query attention).
        group_k = kv_heads_for_queries(k, first, end, per_kv, 1) if per_kv > 1 else k[:, first:end]
        group_v = kv_heads_for_queries(v, first, end, per_kv, 1) if per_kv > 1 else v[:, first:end]
        out[:, first:end] = _rule_attention(rule, q[:, first:end], group_k, group_v, chunk, scaling, block_attention)
    return out


def _rule_attention(rule: Rule, q, k, v, chunk: int, scaling: float, kernel: BlockAttention) -> torch.Tensor:
    n = q.shape[2]
    if rule.kind == "causal":
        return kernel(q, k, v, True, scaling)
    if rule.kind == "local":
        return _local(q, k, v, chunk, scaling, kernel)
    if rule.kind == "shifted":
        first_segment = min(n, chunk - rule.shift_for(chunk) % chunk)
        if first_segment == chunk:  # a shift of a whole number of chunks is no shift
            return _local(q, k, v, chunk, scaling, kernel)
        head = kernel(q[:, :, :first_segment], k[:, :, :first_segment], v[:, :, :first_segment], True, scaling)
        rest = _local(q[:, :, first_segment:], k[:, :, first_segment:], v[:, :, first_segment:],
                      chunk, scaling, kernel)
        return torch.cat([head, rest], dim=2)
    if rule.kind == "cross":
        return _cross(q, k, v, chunk, rule.distance, scaling, kernel)
    return _dilated(q, k, v, rule.rate, rule.offset, scaling, kernel)


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad the position axis (2) at the end up to ``length``."""
    missing = length - x.shape[2]
    return x if missing == 0 else F.pad(x, (0, 0, 0, missing))


def _as_chunks(x: torch.Tensor, chunks: int, chunk: int) -> torch.Tensor:
    """[B, h, chunks*chunk, D] -> [B, h*chunks, chunk, D] (one batch entry per chunk)."""
    b, h, _, d = x.shape
    return x.reshape(b, h * chunks, chunk, d)


def _local(q, k, v, chunk: int, scaling: float, kernel: BlockAttention) -> torch.Tensor:
    b, h, n, _ = q.shape
    if n == 0:
        return q.new_empty(b, h, 0, v.shape[-1])
    if n <= chunk:
        return kernel(q, k, v, True, scaling)
    chunks = -(-n // chunk)
    blocks = [_as_chunks(_pad_to(x, chunks * chunk), chunks, chunk) for x in (q, k, v)]
    out = kernel(*blocks, True, scaling)
    return out.reshape(b, h, chunks * chunk, -1)[:, :, :n]


def _cross(q, k, v, chunk: int, distance: int, scaling: float, kernel: BlockAttention) -> torch.Tensor:
    b, h, n, _ = q.shape
    chunks = -(-n // chunk)
    if distance == 0 or distance >= chunks:
        return _local(q, k, v, chunk, scaling, kernel)
    # Chunks before `distance` have no chunk that far back: local fallback.
    start = distance * chunk
    head = _local(q[:, :, :start], k[:, :, :start], v[:, :, :start], chunk, scaling, kernel)
    # Query chunk c (>= distance) sees all of key chunk c - distance; those key
    # chunks are 0 .. chunks-1-distance, all complete.
    pairs = chunks - distance
    queries = _as_chunks(_pad_to(q[:, :, start:], pairs * chunk), pairs, chunk)
    keys = _as_chunks(k[:, :, :pairs * chunk], pairs, chunk)
    values = _as_chunks(v[:, :, :pairs * chunk], pairs, chunk)
    tail = kernel(queries, keys, values, False, scaling).reshape(b, h, pairs * chunk, -1)[:, :, :n - start]
    return torch.cat([head, tail], dim=2)


def _by_residue(x: torch.Tensor, rate: int) -> torch.Tensor:
    """[B, h, N, D] -> [B, h, r, L, D]: class a holds positions a, a + r, a + 2r, ... (padded)."""
    b, h, n, d = x.shape
    length = -(-n // rate)
    return _pad_to(x, rate * length).reshape(b, h, length, rate, d).transpose(2, 3)


def _dilated(q, k, v, rate: int, offset: int, scaling: float, kernel: BlockAttention) -> torch.Tensor:
    b, h, n, _ = q.shape
    qc, kc, vc = (_by_residue(x, rate) for x in (q, k, v))
    length = qc.shape[3]
    out = q.new_zeros(b, h, rate, length, v.shape[-1])

    # Residue classes as slices, never as index lists: a list index is copied to the GPU
    # on every call, and that copy waits for the host.
    def run(classes: range, strict: bool) -> None:
        if not classes:
            return
        # classes a see key class (a - offset) mod r: a contiguous run that does not wrap
        first_key = (classes[0] - offset) % rate
        queries, keys = slice(classes[0], classes[-1] + 1), slice(first_key, first_key + len(classes))
        qs, ks, vs = qc[:, :, queries], kc[:, :, keys], vc[:, :, keys]
        if strict:  # query i attends keys 0..i-1: causal with queries one step ahead
            if length < 2:
                return
            qs, ks, vs = qs[:, :, :, 1:], ks[:, :, :, :-1], vs[:, :, :, :-1]
        steps = qs.shape[3]
        flat = [x.reshape(b, h * len(classes), steps, x.shape[-1]) for x in (qs, ks, vs)]
        result = kernel(*flat, True, scaling).reshape(b, h, len(classes), steps, -1)
        if strict:
            out[:, :, queries, 1:] = result
        else:
            out[:, :, queries] = result

    run(range(offset, rate), strict=False)
    strict_classes = range(0, offset)
    run(strict_classes, strict=True)
    # q < offset: no key at a qualifying distance, so the query attends itself.
    if strict_classes:
        out[:, :, :offset, 0] = vc[:, :, :offset, 0]
    return out.transpose(2, 3).reshape(b, h, rate * length, -1)[:, :, :n]
