"""The strided backend (attention/strided.py) against the dense reference mask:
every preset and custom mixes in fp32 (1e-5), alone and inside a whole model,
its place in the dispatch, and the copy-free hand-over to transformers."""

from __future__ import annotations

import copy

import pytest
import torch

from scca_eval.attention import (
    apply_pattern,
    call_counts,
    masked_attention,
    pattern_attention,
    reset_call_counts,
    resolve_backend,
    strided_pattern_attention,
)
from scca_eval.attention import register, strided
from scca_eval.patterns import PRESET_DESCRIPTIONS, build_mask, resolve_pattern
from helpers import (BF16_REL_TOL, CUSTOM, dense_attention, dense_mask, logits, random_qkv, spec_named, tiny_llama,
                     token_batch)

PRESETS = list(PRESET_DESCRIPTIONS)
MIXES = [
    "1/3 shifted(3) + 1/3 cross(2) + 1/3 dilated(3,2)",
    "1/2 dilated(5,4) + 1/4 shifted(0) + 1/4 cross(0)",
    "1/4 local + 1/4 shifted(3) + 1/2 dilated(3,1)",
    "0.5 causal + 0.5 shifted(11)",
    "cross(3)",
    "dilated(4,3)",
    "dilated(1,0)",
]
TOLERANCE = 1e-5  # fp32

SHAPES = [
    # (batch, heads, kv_heads, n, chunk_size)
    (1, 9, 3, 37, 5),  # SmolLM2's 9/3 heads (groups split key/value heads), N odd and not a multiple of G
    (3, 9, 3, 36, None),  # batch 3, N a multiple of every rate up to 4: residue views
    (3, 8, 4, 40, 6),  # batch 3, aligned head groups, a last partial chunk
    (1, 8, 2, 64, None),
    (1, 2, 1, 30, 7),  # fewer heads than groups (longmixed, flow, the mixes)
    (3, 3, 3, 23, 8),
    (1, 4, 2, 2, 1),
    (1, 4, 4, 1, None),
]


def qkv(batch, heads, kv_heads, n, dim=8, seed=0, transformers_layout=True):
    """Random q, k, v; by default in transformers' memory layout ([B, N, H, D] seen as [B, H, N, D])."""
    generator = torch.Generator().manual_seed(seed)

    def make(h):
        if transformers_layout:
            return torch.randn(batch, n, h, dim, generator=generator).transpose(1, 2)
        return torch.randn(batch, h, n, dim, generator=generator)

    return make(heads), make(kv_heads), make(kv_heads)


def specs_for(pattern: str, chunk_size):
    specs = [resolve_pattern(pattern, chunk_size=chunk_size)]
    if pattern == "sda":
        specs += [resolve_pattern(pattern, chunk_size=chunk_size, dilation=r) for r in (3, 4)]
    return specs


@pytest.mark.parametrize("pattern", PRESETS + MIXES)
@pytest.mark.parametrize("batch,heads,kv_heads,n,chunk_size", SHAPES)
def test_strided_equals_reference(pattern, batch, heads, kv_heads, n, chunk_size):
    q, k, v = qkv(batch, heads, kv_heads, n, seed=n + heads)
    for spec in specs_for(pattern, chunk_size):
        expected = masked_attention(q, k, v, build_mask(spec, n, heads), 0.3)
        out = strided_pattern_attention(q, k, v, spec, 0.3)
        assert out.shape == (batch, heads, n, 8) and out.dtype == torch.float32
        assert (out - expected).abs().max().item() <= TOLERANCE, spec.to_dict()


@pytest.mark.parametrize("pattern", ["longmixed", "scca_flow", MIXES[0]])
def test_strided_with_contiguous_inputs(pattern):
    # [B, H, N, D] in memory, as a caller outside transformers may pass them
    q, k, v = qkv(3, 9, 3, 37, transformers_layout=False)
    spec = resolve_pattern(pattern, chunk_size=5)
    expected = masked_attention(q, k, v, build_mask(spec, 37, 9), 0.3)
    assert (strided_pattern_attention(q, k, v, spec, 0.3) - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("pattern,heads,kv_heads,n", [
    ("s2", 8, 4, 40), ("scca_fixed", 8, 4, 40), ("scca_flow", 8, 8, 40), ("sda", 8, 4, 40),
    ("longmixed", 16, 16, 48), ("1/4 local + 1/4 shifted(3) + 1/2 dilated(3,1)", 8, 4, 48),
    # groups that split a key/value head (SmolLM2's 9 over 3) read copied K/V heads, still views
    ("sda", 9, 3, 40), ("scca_fixed", 9, 3, 40), ("longmixed", 9, 3, 48),
])
def test_view_path_without_fallback(monkeypatch, pattern, heads, kv_heads, n):
    """N a multiple of every rate: views only (whole key/value heads or copies of them),
    so the tests above do check the view layout and not just the chunked fallback."""
    def refuse(*args, **kwargs):
        raise AssertionError("fell back to the chunked layout")

    monkeypatch.setattr(strided, "chunked_pattern_attention", refuse)
    q, k, v = qkv(2, heads, kv_heads, n, seed=1)
    spec = resolve_pattern(pattern, chunk_size=6)
    expected = masked_attention(q, k, v, build_mask(spec, n, heads), 0.3)
    assert (strided_pattern_attention(q, k, v, spec, 0.3) - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("name", ["s2", "scca_fixed", "scca_flow", "sda", "sda4", "longmixed", "custom"])
@pytest.mark.parametrize("batch,n,heads,kv_heads", [(1, 256, 8, 4), (2, 131, 9, 3), (2, 96, 6, 6)])
def test_strided_matches_the_float64_rule_reference(name, batch, n, heads, kv_heads):
    """A second yardstick: the mask straight from Rule.allows, float64 softmax (tests/attention/test_flex.py)."""

    spec = spec_named(name)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2)
               for x in random_qkv(batch, heads, kv_heads, n, 16, seed=n))
    out = strided_pattern_attention(q, k, v, spec, 0.3)
    assert torch.allclose(out.double(), dense_attention(q, k, v, dense_mask(spec, n, heads), 0.3), atol=1e-5, rtol=0)


def test_result_is_a_view_of_the_transformers_layout():
    q, k, v = qkv(2, 9, 3, 37)
    out = strided_pattern_attention(q, k, v, resolve_pattern("longmixed", chunk_size=5), 0.3)
    assert out.transpose(1, 2).is_contiguous()


def test_rejects_mismatched_shapes():
    q, k, v = qkv(1, 6, 4, 32)
    with pytest.raises(ValueError, match="share"):
        strided_pattern_attention(q, k, v, resolve_pattern("s2"), 1.0)
    q, k, v = qkv(1, 4, 2, 32)
    with pytest.raises(ValueError, match="as many keys"):
        strided_pattern_attention(q, k[:, :, :16], v[:, :, :16], resolve_pattern("s2"), 1.0)


# -- dispatch ---------------------------------------------------------------------------
def test_auto_picks_strided_on_cuda_without_varlen_chunked_on_cpu_sdpa_for_full(monkeypatch):
    from scca_eval.attention import packed

    sparse, full = resolve_pattern("s2"), resolve_pattern("full")
    monkeypatch.setattr(packed, "_VARLEN", None)  # a PyTorch without varlen_attn: auto's rule keeps strided
    assert resolve_backend(sparse, torch.device("cuda", 0)) == "strided"
    assert resolve_backend(sparse, torch.device("cpu")) == "chunked"
    assert resolve_backend(full, torch.device("cuda", 0)) == "sdpa"
    assert resolve_backend(full, torch.device("cpu")) == "sdpa"
    assert resolve_backend(sparse, torch.device("cpu"), "strided") == "strided"
    assert resolve_backend(sparse, torch.device("cuda", 0), "flex") == "flex"


def test_dispatch_runs_and_counts_strided():
    reset_call_counts()
    q, k, v = qkv(2, 9, 3, 29)
    for name in PRESETS[1:]:
        spec = resolve_pattern(name)
        expected = masked_attention(q, k, v, build_mask(spec, 29, 9), 0.3)
        out = pattern_attention(q, k, v, spec, 0.3, backend="strided")
        assert (out - expected).abs().max().item() <= TOLERANCE, name
    assert call_counts() == {"strided": len(PRESETS) - 1}
    reset_call_counts()


# -- inside a model ---------------------------------------------------------------------
MODEL_IDS = token_batch(batch=3, n=37)


@pytest.fixture(scope="module")
def models():
    # LLaMA-like 4/2 heads, and SmolLM2's attention layout of 9 query heads on 3 key/value heads
    return {"llama": tiny_llama(), "smollm": tiny_llama(heads=9, kv_heads=3, head_dim=8, seed=1)}


@pytest.fixture(scope="module")
def plain_logits(models):
    return {name: logits(model, MODEL_IDS) for name, model in models.items()}


@pytest.mark.parametrize("pattern", PRESETS + [MIXES[2]])
@pytest.mark.parametrize("model_name", ["llama", "smollm"])
def test_model_strided_equals_reference(models, plain_logits, pattern, model_name):
    model = models[model_name]
    spec = resolve_pattern(pattern, chunk_size=None if pattern in PRESETS else 5)
    ids = MODEL_IDS
    strided_model, reference_model = copy.deepcopy(model), copy.deepcopy(model)
    apply_pattern(strided_model, spec, backend="strided")
    apply_pattern(reference_model, spec, backend="reference")
    reset_call_counts()
    out = logits(strided_model, ids)
    if not spec.is_full:  # full keeps transformers' own SDPA whatever the backend
        assert call_counts() == {"strided": model.config.num_hidden_layers}
    expected = logits(reference_model, ids)
    assert torch.allclose(out, expected, atol=1e-4), (out - expected).abs().max()
    if not spec.is_full:
        assert (expected - plain_logits[model_name]).abs().max() > 1e-3  # and the pattern matters
    reset_call_counts()


@pytest.mark.parametrize("backend,copied", [("strided", False), ("chunked", True)])
def test_hand_over_to_transformers_copies_only_when_needed(models, monkeypatch, backend, copied):
    """scca_attention returns [B, N, H, D]: the strided result already lies that way,
    so it goes out as it is; a [B, H, N, D] result is copied once."""
    model = copy.deepcopy(models["smollm"])
    apply_pattern(model, resolve_pattern("longmixed", chunk_size=5), backend=backend)
    results = []

    def spy(*args, **kwargs):
        results.append(register_pattern_attention(*args, **kwargs))
        return results[-1]

    register_pattern_attention = register.pattern_attention
    monkeypatch.setattr(register, "pattern_attention", spy)
    module = model.model.layers[0].self_attn
    q, k, v = qkv(2, 9, 3, 37)
    out, weights = register.scca_attention(module, q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (2, 37, 9, 8) and out.is_contiguous()
    assert (out.data_ptr() != results[0].data_ptr()) == copied
    assert torch.equal(out, results[0].transpose(1, 2))


# -- GPU (skipped without one) --------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("name", PRESETS + ["sda-r4", "custom"])
def test_gpu_strided_bf16_matches_reference(name):

    specials = {"custom": CUSTOM, "sda-r4": resolve_pattern("sda", dilation=4)}
    spec = specials[name] if name in specials else resolve_pattern(name)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2)
               for x in random_qkv(1, 32, 8, 2048, 128, dtype=torch.bfloat16, device="cuda", seed=2))
    ref = dense_attention(q, k, v, dense_mask(spec, 2048, 32).cuda(), 128 ** -0.5)
    out = strided_pattern_attention(q, k, v, spec, 128 ** -0.5)
    assert torch.isfinite(out).all()
    assert float((out.double() - ref).norm() / ref.norm()) < BF16_REL_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["longmixed", MIXES[0], MIXES[1]])
def test_gpu_streams_equal_one_stream_and_reference(pattern):
    # batch 3, 9/3 heads, N not a multiple of G: views, fallbacks and copies all on side streams
    q, k, v = (x.cuda() for x in qkv(3, 9, 3, 301, dim=64, seed=4))
    spec = resolve_pattern(pattern, chunk_size=40)
    expected = masked_attention(q, k, v, build_mask(spec, 301, 9, "cuda"), 0.125)
    torch.cuda.synchronize()
    spread = strided_pattern_attention(q, k, v, spec, 0.125)
    serial = strided_pattern_attention(q, k, v, spec, 0.125, streams=1)
    assert torch.equal(spread, serial)
    # the GPU may run fp32 dot products in tf32
    assert float((spread - expected).norm() / expected.norm()) < 1e-3


@pytest.mark.parametrize("first,end", [(0, 5), (5, 9), (2, 7), (0, 9), (4, 5)])
def test_kv_heads_for_query_heads_match_an_index_select(first, end):
    """Query heads [first, end) of 9 over 3 key/value heads: each reads key/value head h // 3,
    in either memory layout, with the layout index_select gives and its gradient."""
    from scca_eval.attention.chunked import kv_heads_for_queries

    index = torch.arange(first, end) // 3
    for dim in (1, 2):
        x = torch.randn(2, 7, 3, 4, dtype=torch.float64).transpose(1, 2).transpose(1, dim).requires_grad_()
        got = kv_heads_for_queries(x, first, end, 3, dim)
        expected = x.index_select(dim, index)
        assert torch.equal(got, expected) and got.stride() == expected.stride()
        upstream = torch.randn_like(got)
        assert torch.equal(torch.autograd.grad(got, x, upstream)[0], torch.autograd.grad(expected, x, upstream)[0])
