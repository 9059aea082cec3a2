"""Plain softmax attention under a dense boolean mask: slow and obviously right.

This is the yardstick of every fast path (docs/patterns.md, property 3).
"""

from __future__ import annotations

import torch


def expand_kv_heads(kv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, H_kv, N, D] -> [B, H, N, D]: query head h uses key/value head h // (H // H_kv)."""
    kv_heads = kv.shape[1]
    if num_heads % kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {kv_heads} key/value heads evenly")
    return kv.repeat_interleave(num_heads // kv_heads, dim=1)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scaling: float) -> torch.Tensor:
    """softmax(q k^T * scaling, keys where mask is False removed) v, in float32 (float64 for float64 inputs).

    q: [B, H, N, D]; k, v: [B, H_kv, N, D]; mask: bool [H, N, N] (True = attends).
    Returns [B, H, N, D] in q's dtype. Differentiable: the yardstick of the fast
    paths' gradients too.
    """
    num_heads = q.shape[1]
    # never below float32, but float64 stays float64 (gradient checks run in it)
    compute = torch.promote_types(q.dtype, torch.float32)
    keys = expand_kv_heads(k, num_heads).to(compute)
    values = expand_kv_heads(v, num_heads).to(compute)
    scores = torch.matmul(q.to(compute), keys.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, values).to(q.dtype)
