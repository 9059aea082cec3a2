"""Pattern attention as one variable-length FlashAttention call per layer (two with ``cross``).

The heads are folded into the token axis: the queries of every head (and the key/value
head each of them reads, repeated per query head under grouped-query attention) are copied
into the packed layout (attention/packing.py) by strided copies, one call of
``torch.nn.attention.varlen.varlen_attn`` attends all of them, and one more copy puts the
outputs back into transformers' ``[B, N, H, D]`` order. Autograd carries the gradients back
through the copies (a grouped key/value head's gradient is the sum over its query heads).

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
from .packing import expand_kv_heads, pack_keys, pack_queries, pack_reach, packed_plan, unpack

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

    def call(index, queries, keys, values):  # [T, D] each: the heads are tokens, one kernel head
        spec_ = plan.calls[index]
        return kernel(queries.unsqueeze(1), keys.unsqueeze(1), values.unsqueeze(1), spec_.cu_q, spec_.cu_k,
                      spec_.max_q, spec_.max_k, spec_.causal, scaling).squeeze(1)

    k, v = expand_kv_heads(k, plan.per_kv), expand_kv_heads(v, plan.per_kv)  # a key/value head per query head
    causal = call(0, pack_queries(plan, q), pack_keys(plan, k), pack_keys(plan, v))
    far = None
    if plan.reaches:
        far = call(1, pack_reach(plan, q, keys=False), pack_reach(plan, k, keys=True), pack_reach(plan, v, keys=True))
    return unpack(plan, causal, far)
