"""Pattern attention as one variable-length FlashAttention call per layer (two with ``cross``).

The heads are folded into the token axis: the queries of every head (and the key/value
head each of them reads, repeated per query head under grouped-query attention) are
gathered into the segments of the packed layout (attention/packing.py), one call of
``torch.nn.attention.varlen.varlen_attn`` attends all of them, and one gather puts the
outputs back into transformers' ``[B, N, H, D]`` order. Gathers are ``index_select``, so
autograd carries the gradients back through them (the key/value gradients summed in float32).

``varlen_attn`` is FlashAttention: CUDA only, float16 or bfloat16, a head dimension that
is a multiple of 8 up to 256. Elsewhere the same segments run through
:func:`segment_attention`, plain SDPA over the segments grouped by length — exact, and
what the CPU tests check the layout with, but no faster than the other backends.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F

from ..patterns.spec import PatternSpec
from .chunked import grad_in_output_layout, query_heads_per_kv
from .packing import packed_plan

# kernel(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale) -> out, the varlen contract:
# q [T_q, h, D], k and v [T_k, h, D]; segment i is rows cu_q[i]:cu_q[i+1] of q against rows
# cu_k[i]:cu_k[i+1] of k and v; causal: query i of a segment attends its keys 0..i.
VarlenKernel = Callable[..., torch.Tensor]


def _find_varlen():
    """PyTorch's varlen_attn and how its version takes causality and the scale (None: absent).

    Its keywords changed between releases: ``is_causal`` in the first, ``window_size``
    ((-1, 0) causal, (-1, -1) full) later; ``scale`` came with ``window_size``.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if "window_size" not in parameters and "is_causal" not in parameters:
        return None
    return varlen_attn, "window_size" in parameters, "scale" in parameters


_VARLEN = _find_varlen()


def varlen_available() -> bool:
    """Whether this PyTorch has a varlen_attn this module can call."""
    return _VARLEN is not None


_supported: dict = {}


def varlen_supported(q: torch.Tensor) -> bool:
    """Whether FlashAttention's varlen kernel takes queries like ``q`` ([..., D]) (cached per
    device, dtype and head dimension)."""
    key = (q.device, q.dtype, q.shape[-1])
    known = _supported.get(key)  # a plain read, so that torch.compile traces it without a break
    if known is None:
        head_dim = q.shape[-1]
        known = _supported[key] = (
            _VARLEN is not None and q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)
            and head_dim % 8 == 0 and head_dim <= 256 and torch.cuda.get_device_capability(q.device) >= (8, 0))
    return known


def flash_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float) -> torch.Tensor:
    """``torch.nn.attention.varlen.varlen_attn`` in the varlen contract, on whichever keywords it has."""
    varlen_attn, takes_window, takes_scale = _VARLEN
    options = {"window_size": (-1, 0) if causal else (-1, -1)} if takes_window else {"is_causal": causal}
    if takes_scale:
        options["scale"] = scale
    else:  # the first release always scales by D ** -0.5: fold the rest into the queries
        q = q * (scale * q.shape[-1] ** 0.5)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **options)


def segment_attention(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float) -> torch.Tensor:
    """The varlen contract in plain torch: SDPA over the segments, grouped by their lengths.

    Reads the segment bounds from ``cu_q``/``cu_k`` (a host sync: for CPU runs and tests).
    """
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    groups: dict[tuple[int, int], list[int]] = {}
    for index in range(len(starts_q) - 1):
        lengths = (starts_q[index + 1] - starts_q[index], starts_k[index + 1] - starts_k[index])
        if lengths[0] > max_q or lengths[1] > max_k:
            raise ValueError(f"segment {index} ({lengths[0]} queries, {lengths[1]} keys) is longer than "
                             f"max_q {max_q} / max_k {max_k}")
        if causal and lengths[0] != lengths[1]:
            raise ValueError(f"causal segment {index} has {lengths[0]} queries but {lengths[1]} keys")
        groups.setdefault(lengths, []).append(index)
    outputs, rows = [], []
    for (length_q, length_k), members in groups.items():
        first_q = torch.tensor([starts_q[i] for i in members], device=q.device)
        first_k = torch.tensor([starts_k[i] for i in members], device=q.device)
        q_rows = (first_q[:, None] + torch.arange(length_q, device=q.device)).reshape(-1)
        k_rows = (first_k[:, None] + torch.arange(length_k, device=q.device)).reshape(-1)

        def segments(x, index, length):  # [S * L, h, D] -> [S, h, L, D]
            return x.index_select(0, index).unflatten(0, (len(members), length)).transpose(1, 2)

        out = grad_in_output_layout(F.scaled_dot_product_attention(
            segments(q, q_rows, length_q), segments(k, k_rows, length_k), segments(v, k_rows, length_k),
            is_causal=causal, scale=scale))
        outputs.append(out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[-1]))  # [S * L, h, D]
        rows.append(q_rows)
    order = torch.empty(len(q), dtype=torch.long, device=q.device)
    order[torch.cat(rows)] = torch.arange(len(q), device=q.device)
    return torch.cat(outputs).index_select(0, order)


class _GatherRows(torch.autograd.Function):
    """``x.index_select(0, rows)`` whose backward adds repeated rows up in float32.

    A key/value row is gathered once per query head that reads it (and twice where a
    ``cross`` chunk is a key of two segments), and its gradient is the sum of the copies' gradients.
    Summed in bf16 that would round once per copy; in float32 it rounds once, as a fused
    kernel's own reduction over grouped heads does.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.rows_of_x = x.shape[0]
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        wide = torch.promote_types(grad.dtype, torch.float32)
        total = grad.new_zeros((ctx.rows_of_x, *grad.shape[1:]), dtype=wide)
        total.index_add_(0, rows, grad.to(wide))
        return total.to(grad.dtype), None


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """[B, h, N, D] -> [B * N * h, D], row (b * N + p) * h + i: a view of transformers' [B, N, h, D] memory."""
    return x.transpose(1, 2).reshape(-1, x.shape[-1])


def packed_pattern_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: PatternSpec,
                             scaling: float, *, kernel: VarlenKernel | None = None) -> torch.Tensor:
    """Attention of ``spec`` for q [B, H, N, D], k, v [B, H_kv, N, D] -> [B, H, N, D] ([B, N, H, D] in memory).

    kernel: the varlen kernel (default: FlashAttention's where it takes the inputs, see
    ``varlen_supported``, else ``segment_attention``).
    """
    batch, num_heads, n, _ = q.shape
    query_heads_per_kv(q, k)  # checks the shapes
    if kernel is None:
        kernel = flash_varlen if varlen_supported(q) else segment_attention
    plan = packed_plan(spec, n, num_heads, k.shape[1], batch, q.device)
    queries, keys, values = _token_rows(q), _token_rows(k), _token_rows(v)
    outputs = []
    for call in plan.calls:
        pq = queries.index_select(0, call.q_rows).unsqueeze(1)  # [T, 1, D]: one head, the heads are tokens
        pk = _GatherRows.apply(keys, call.k_rows).unsqueeze(1)
        pv = _GatherRows.apply(values, call.k_rows).unsqueeze(1)
        outputs.append(kernel(pq, pk, pv, call.cu_q, call.cu_k, call.max_q, call.max_k, call.causal, scaling))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    out = out.squeeze(1).index_select(0, plan.order)
    return out.view(batch, n, num_heads, v.shape[-1]).transpose(1, 2)
