"""Pattern attention as one variable-length FlashAttention call per head group (two with ``cross``).

Each head group (heads that share a rule) keeps its heads in the kernel's head axis and
its tokens in the token axis of transformers' ``[B, N, H, D]`` memory: a group is a head
slice of that memory, viewed as ``[B * N, heads, D]``, and its rule is only a table of
segment bounds (attention/packing.py). Causal, local, shifted and ``cross`` rules read
slices of that view (no copy in one window); ``dilated`` gathers whole tokens by residue
class. Key/value heads are repeated per query head where the grouped-query heads differ
(the varlen kernel takes as many key as query heads). Each call writes its head slice of
one ``[B, N, H, D]`` output, so the transpose that follows attention in transformers is free.

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
    """PyTorch's varlen_attn and how its version takes causality, the scale and grouped-query
    heads (None: absent).

    Its keywords changed between releases: ``is_causal`` in the first, ``window_size``
    ((-1, 0) causal, (-1, -1) full) later; ``scale`` came with ``window_size``; ``enable_gqa``
    (fewer key/value than query heads) later still.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if "window_size" not in parameters and "is_causal" not in parameters:
        return None
    return varlen_attn, "window_size" in parameters, "scale" in parameters, "enable_gqa" in parameters


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
    varlen_attn, takes_window, takes_scale, _ = _VARLEN
    options = {"window_size": (-1, 0) if causal else (-1, -1)} if takes_window else {"is_causal": causal}
    if k.shape[1] != q.shape[1]:  # only where kernel_takes_grouped_heads said so
        options["enable_gqa"] = True
    if takes_scale:
        options["scale"] = scale
    else:  # the first release always scales by D ** -0.5: fold the rest into the queries
        q = q * (scale * q.shape[-1] ** 0.5)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **options)


def kernel_takes_grouped_heads(kernel: VarlenKernel) -> bool:
    """Whether ``kernel`` takes fewer key/value heads than query heads (each shared by a run
    of query heads), so that they need not be repeated; else they are."""
    return kernel is flash_varlen and _VARLEN is not None and _VARLEN[3]


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


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands the gradient on contiguous.

    The gradient of a head slice of the output is a strided view of the whole output's
    gradient; the fused kernels' backward is given the contiguous layout a plain loss on
    their own output would give (see ``grad_in_output_layout`` in chunked.py, which does
    the same with a hook that torch.compile cannot trace).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """[B, h, N, D] -> [B * N, h, D]: a view of transformers' [B, N, h, D] memory."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[-1])


def _group_kv(x: torch.Tensor, first: int, end: int, per_kv: int) -> tuple[torch.Tensor, int]:
    """The key/value heads that query heads first:end read, from x [T, H_kv, D]: a head slice
    when the group holds whole key/value heads, and how often each must be repeated."""
    if first % per_kv == 0 and end % per_kv == 0:
        return x[:, first // per_kv:end // per_kv], per_kv
    kv_index = torch.arange(first, end, device=x.device) // per_kv  # the group splits a key/value head
    return x.index_select(1, kv_index), 1


def _repeat_heads(x: torch.Tensor, times: int) -> torch.Tensor:
    """[T, h, D] -> [T, h * times, D], each head repeated ``times`` times in a row (its
    gradient is a sum over the copies, accumulated in float32 by the reduction)."""
    if times == 1:
        return x
    rows, heads, dim = x.shape
    return x.unsqueeze(2).expand(rows, heads, times, dim).reshape(rows, heads * times, dim)


def packed_pattern_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: PatternSpec,
                             scaling: float, *, kernel: VarlenKernel | None = None) -> torch.Tensor:
    """Attention of ``spec`` for q [B, H, N, D], k, v [B, H_kv, N, D] -> [B, H, N, D] ([B, N, H, D] in memory).

    kernel: the varlen kernel (default: FlashAttention's where it takes the inputs, see
    ``varlen_supported``, else ``segment_attention``).
    """
    batch, num_heads, n, _ = q.shape
    per_kv = query_heads_per_kv(q, k)  # checks the shapes
    if kernel is None:
        kernel = flash_varlen if varlen_supported(q) else segment_attention
    plan = packed_plan(spec, n, num_heads, k.shape[1], batch, q.device)
    queries, keys, values = _token_rows(q), _token_rows(k), _token_rows(v)
    grouped = kernel_takes_grouped_heads(kernel)
    out = None
    for group in plan.groups:
        group_q = queries[:, group.first:group.end]
        group_k, times = _group_kv(keys, group.first, group.end, per_kv)
        group_v, _ = _group_kv(values, group.first, group.end, per_kv)
        if grouped:
            times = 1
        for call in group.calls:
            result = kernel(call.q_rows.take(group_q),
                            _repeat_heads(call.k_rows.take(group_k), times),
                            _repeat_heads(call.k_rows.take(group_v), times),
                            call.cu_q, call.cu_k, call.max_q, call.max_k, call.causal, scaling)
            if len(plan.groups) == 1 and len(group.calls) == 1 and call.q_rows.index is None:
                out = result  # one call over every token in order: its output is the answer
                continue
            if out is None:
                out = q.new_empty(batch * n, num_heads, v.shape[-1])
            call.q_rows.put(out[:, group.first:group.end], _ContiguousGrad.apply(result))
    return out.view(batch, n, num_heads, v.shape[-1]).transpose(1, 2)
