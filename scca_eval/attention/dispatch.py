"""Pick the attention backend for one call of a pattern.

Backends (all take q [B, H, N, D], k, v [B, H_kv, N, D] and return [B, H, N, D]):

- ``reference``: the dense boolean mask and plain softmax (slow; for tests).
- ``chunked``:   plain torch on any device (attention/chunked.py).
- ``strided``:   the chunked decomposition as SDPA calls over strided views of
                 the [B, N, H, D] memory, spread over CUDA streams
                 (attention/strided.py; any device).
- ``packed``:    every head's segments in one variable-length FlashAttention
                 call per layer (two where a ``cross`` rule is present;
                 attention/packed.py); off CUDA or in float32 the same segments
                 run through plain SDPA.
- ``flex``:      FlexAttention block masks (attention/flex.py).
- ``flash``:     the chunked layout run by the flash-attn package's kernel
                 (optional: ``pip install 'scca-eval[flash]'``).
- ``auto``:      SDPA for the full pattern; for a sparse one on CUDA the fastest
                 backend measured for the case (``backend_table.json``), else
                 ``strided`` for a forward alone and, for a forward with a backward to
                 come, ``packed`` where FlashAttention takes the inputs, else
                 ``strided``; ``chunked`` off CUDA (attention/auto.py).

A per-process counter records which backend ran, so that callers can check
that a pattern really took effect (``call_counts()``).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F

from ..choices import ATTENTION_BACKENDS
from ..errors import MissingDependency, UserError
from ..patterns.masks import build_mask
from ..patterns.spec import PatternSpec
from . import auto
from .chunked import chunked_pattern_attention
from .packed import packed_pattern_attention
from .reference import masked_attention
from .strided import strided_pattern_attention

BACKENDS = ATTENTION_BACKENDS + ("sdpa",)

_calls: Counter = Counter()


def call_counts() -> dict[str, int]:
    """How many times each backend ran in this process (keys: backend names)."""
    return dict(_calls)


def reset_call_counts() -> None:
    _calls.clear()


def full_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """Ordinary causal attention through SDPA (grouped-query heads shared natively)."""
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, **gqa)


def resolve_backend(spec: PatternSpec, device: torch.device, backend: str = "auto",
                    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> str:
    """The backend that ``pattern_attention`` will use for ``spec`` on ``device``.

    inputs: the call's (q, k, v), for auto's measured choice (attention/auto.py); without
    them auto answers by its rule for the device alone.
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "sdpa" and not spec.is_full:
        raise UserError(f"the sdpa backend runs only the full pattern, not {spec.name!r}; "
                        "use --attention-backend auto")
    if backend != "auto":
        return backend
    if spec.is_full:
        return "sdpa"
    if inputs is None:
        return auto.rule_without_inputs(device)
    return auto.choose(spec, *inputs)


def pattern_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: PatternSpec,
                      scaling: float, backend: str = "auto") -> torch.Tensor:
    """Attention of ``spec`` for q [B, H, N, D] and k, v [B, H_kv, N, D] -> [B, H, N, D]."""
    chosen = resolve_backend(spec, q.device, backend, (q, k, v))
    if chosen == "sdpa":
        out = full_causal_attention(q, k, v, scaling)
    elif chosen == "packed":
        out = packed_pattern_attention(q, k, v, spec, scaling)
    elif chosen == "strided":
        out = strided_pattern_attention(q, k, v, spec, scaling)
    elif chosen == "chunked":
        out = chunked_pattern_attention(q, k, v, spec, scaling)
    elif chosen == "reference":
        mask = build_mask(spec, q.shape[2], q.shape[1], device=q.device)
        out = masked_attention(q, k, v, mask, scaling)
    elif chosen == "flex":
        from .flex import flex_pattern_attention  # imported late: it compiles kernels

        out = flex_pattern_attention(q, k, v, spec, scaling)
    else:
        out = chunked_pattern_attention(q, k, v, spec, scaling, block_attention=_flash_blocks())
    if not torch.compiler.is_compiling():
        # counted in eager runs only: compiled code that read the count would be guarded on
        # its value and compiled again at every call
        _calls[chosen] += 1
    return out


def _flash_blocks():
    """The flash-attn kernel in the chunked layout's block contract."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        raise MissingDependency("flash-attn", "flash", "the flash attention backend") from None

    def blocks(q, k, v, causal: bool, scaling: float) -> torch.Tensor:
        # flash-attn wants [B, L, h, D]; every call here has as many keys as queries,
        # so its bottom-right causal alignment equals the top-left one we mean.
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              softmax_scale=scaling, causal=causal)
        return out.transpose(1, 2)

    return blocks
