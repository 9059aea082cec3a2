"""Attention under a pattern: the dense reference against a loop, every fast path
against the dense reference (fp32, 1e-5), and the backend dispatch."""

from __future__ import annotations

import importlib.util
import itertools
import math

import pytest
import torch

from scca_eval.attention import (
    call_counts,
    chunked_pattern_attention,
    masked_attention,
    pattern_attention,
    reset_call_counts,
)
from scca_eval.errors import MissingDependency, UserError
from scca_eval.patterns import PRESET_DESCRIPTIONS, build_mask, resolve_pattern

PRESETS = list(PRESET_DESCRIPTIONS)
MIXES = [
    "1/3 shifted(3) + 1/3 cross(2) + 1/3 dilated(3,2)",
    "1/2 dilated(5,4) + 1/4 shifted(0) + 1/4 cross(0)",
    "0.5 causal + 0.5 shifted(11)",
    "cross(3)",
    "dilated(1,0)",
]
TOLERANCE = 1e-5  # fp32


def qkv(batch, heads, kv_heads, n, dim=8, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, dim, generator=generator, dtype=dtype)
    k = torch.randn(batch, kv_heads, n, dim, generator=generator, dtype=dtype)
    v = torch.randn(batch, kv_heads, n, dim, generator=generator, dtype=dtype)
    return q, k, v


def test_reference_equals_a_plain_loop():
    # one softmax per (batch, head, query), over the keys the mask allows
    batch, heads, kv_heads, n, dim, scaling = 2, 6, 3, 9, 4, 0.7
    q, k, v = qkv(batch, heads, kv_heads, n, dim)
    mask = torch.rand(heads, n, n, generator=torch.Generator().manual_seed(1)) < 0.5
    mask[:, torch.arange(n), torch.arange(n)] = True
    out = masked_attention(q, k, v, mask, scaling)
    for b, h, i in itertools.product(range(batch), range(heads), range(n)):
        kv = h // (heads // kv_heads)
        keys = [j for j in range(n) if mask[h, i, j]]
        scores = [scaling * float(q[b, h, i] @ k[b, kv, j]) for j in keys]
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        expected = sum(w * v[b, kv, j] for w, j in zip(weights, keys)) / sum(weights)
        assert torch.allclose(out[b, h, i], expected, atol=1e-6)


def test_reference_keeps_the_dtype():
    q, k, v = qkv(1, 2, 1, 5, dtype=torch.bfloat16)
    mask = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 5, 5)
    assert masked_attention(q, k, v, mask, 0.5).dtype == torch.bfloat16


SHAPES = [
    # (batch, heads, kv_heads, n, chunk_size): N not divisible by G, SmolLM2's 9/3 heads,
    # fewer heads than groups, batch > 1, windows shorter than a chunk
    (2, 9, 3, 37, None),
    (1, 9, 3, 37, 5),
    (2, 2, 1, 16, 3),
    (1, 4, 4, 1, None),
    (1, 4, 2, 2, 1),
    (3, 3, 3, 23, 8),
    (1, 16, 4, 41, 40),
]


@pytest.mark.parametrize("pattern", PRESETS + MIXES)
@pytest.mark.parametrize("batch,heads,kv_heads,n,chunk_size", SHAPES)
def test_chunked_equals_reference(pattern, batch, heads, kv_heads, n, chunk_size):
    specs = [resolve_pattern(pattern, chunk_size=chunk_size)]
    if pattern == "sda":
        specs += [resolve_pattern(pattern, chunk_size=chunk_size, dilation=r) for r in (3, 4)]
    q, k, v = qkv(batch, heads, kv_heads, n)
    for spec in specs:
        expected = masked_attention(q, k, v, build_mask(spec, n, heads), 0.3)
        out = chunked_pattern_attention(q, k, v, spec, 0.3)
        assert out.shape == (batch, heads, n, 8) and out.dtype == torch.float32
        assert (out - expected).abs().max().item() <= TOLERANCE, spec.to_dict()


def test_chunked_with_non_contiguous_inputs():
    # transformers hands over transposed projections: [B, N, H, D] viewed as [B, H, N, D]
    spec = resolve_pattern("longmixed", chunk_size=4)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in qkv(2, 8, 2, 19))
    expected = masked_attention(q, k, v, build_mask(spec, 19, 8), 0.25)
    assert torch.allclose(chunked_pattern_attention(q, k, v, spec, 0.25), expected, atol=TOLERANCE)


def test_patterns_really_differ():
    q, k, v = qkv(1, 4, 2, 32)
    full = pattern_attention(q, k, v, resolve_pattern("full"), 0.3)
    for name in PRESETS[1:]:
        assert (pattern_attention(q, k, v, resolve_pattern(name), 0.3) - full).abs().max() > 1e-2, name


# -- dispatch -------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "reference", "chunked", "packed", "sdpa"])
def test_dispatch_backends_on_cpu(backend):
    q, k, v = qkv(2, 9, 3, 29)
    names = ["full"] if backend == "sdpa" else PRESETS
    for name in names:
        spec = resolve_pattern(name)
        expected = masked_attention(q, k, v, build_mask(spec, 29, 9), 0.3)
        out = pattern_attention(q, k, v, spec, 0.3, backend=backend)
        assert torch.allclose(out, expected, atol=TOLERANCE), (name, backend)


def test_call_counter_records_the_backend():
    reset_call_counts()
    q, k, v = qkv(1, 4, 2, 12)
    pattern_attention(q, k, v, resolve_pattern("s2"), 0.3)  # CPU: chunked
    pattern_attention(q, k, v, resolve_pattern("s2"), 0.3)
    pattern_attention(q, k, v, resolve_pattern("full"), 0.3)  # full: SDPA
    pattern_attention(q, k, v, resolve_pattern("sda"), 0.3, backend="reference")
    assert call_counts() == {"chunked": 2, "sdpa": 1, "reference": 1}
    reset_call_counts()
    assert call_counts() == {}


def test_bad_backends():
    q, k, v = qkv(1, 4, 2, 8)
    with pytest.raises(UserError, match="unknown attention backend"):
        pattern_attention(q, k, v, resolve_pattern("s2"), 0.3, backend="magic")
    with pytest.raises(UserError, match="only the full pattern"):
        pattern_attention(q, k, v, resolve_pattern("s2"), 0.3, backend="sdpa")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_backend_names_the_extra():
    q, k, v = qkv(1, 4, 2, 8)
    with pytest.raises(MissingDependency, match=r"scca-eval\[flash\]"):
        pattern_attention(q, k, v, resolve_pattern("s2"), 0.3, backend="flash")


@pytest.mark.parametrize("name", PRESETS)
def test_flex_backend_through_dispatch_on_cpu(name):
    q, k, v = qkv(2, 9, 3, 37)
    spec = resolve_pattern(name, chunk_size=5)
    expected = masked_attention(q, k, v, build_mask(spec, 37, 9), 0.3)
    out = pattern_attention(q, k, v, spec, 0.3, backend="flex")
    assert (out - expected).abs().max().item() <= TOLERANCE


# -- GPU (skipped without one) -------------------------------------------------------------
# bf16 keeps 8 bits of mantissa; outputs are averages of values of size ~1, so
# two correct bf16 computations differ by a few units of 2^-8.
BF16_TOLERANCE = 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["chunked", "packed", "auto"])
def test_gpu_bf16_against_reference(backend):
    q, k, v = (x.cuda().to(torch.bfloat16) for x in qkv(2, 8, 2, 300, dim=64))
    for name in PRESETS:
        spec = resolve_pattern(name, chunk_size=64)
        expected = masked_attention(q.float(), k.float(), v.float(), build_mask(spec, 300, 8, "cuda"), 0.125)
        out = pattern_attention(q, k, v, spec, 0.125, backend=backend)
        assert out.dtype == torch.bfloat16
        assert (out.float() - expected).abs().max().item() <= BF16_TOLERANCE, (name, backend)
