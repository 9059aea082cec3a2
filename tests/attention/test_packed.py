"""The packed backend (attention/packing.py, attention/packed.py): its segments against the
dense reference mask pair by pair, its CPU varlen kernel against a masked-SDPA one, the
whole path against the reference in fp32 (every preset, mixes, grouped-query heads, N not
a multiple of G, batches) and inside a model, the compiled path, and auto's choice
(attention/auto.py). Gradients: tests/attention/test_training_attention.py.

GPU tests (FlashAttention's varlen kernel in bf16): ``python -m pytest -q -m gpu tests/attention/test_packed.py``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from helpers import BF16_REL_TOL, CUSTOM, dense_attention, dense_mask, logits, one_thread, random_qkv  # noqa: F401
from helpers import masked_varlen, spec_named, tiny_llama, token_batch
from scca_eval.attention import (apply_pattern, call_counts, masked_attention, packed_pattern_attention,
                                 pattern_attention, reset_call_counts, resolve_backend)
from scca_eval.attention import auto, packed, packing
from scca_eval.attention.packing import WASTE_RUN, build_plan, head_layout
from scca_eval.patterns import PRESET_DESCRIPTIONS, Rule, build_mask, resolve_pattern

PRESETS = list(PRESET_DESCRIPTIONS)
MIXES = [
    "1/3 shifted(3) + 1/3 cross(2) + 1/3 dilated(3,2)",
    "1/2 dilated(5,4) + 1/4 shifted(0) + 1/4 cross(0)",
    "1/4 local + 1/4 shifted(3) + 1/2 dilated(3,1)",
    "0.5 causal + 0.5 shifted(11)",
    "cross(3)",
    "dilated(4,3)",
    "dilated(1,0)",
    "1/2 shifted(40) + 1/2 cross(9)",  # a shift beyond the window, a distance beyond the chunks
]
TOLERANCE = 1e-5  # fp32
SHAPES = [
    # (batch, heads, kv_heads, n, chunk_size)
    (1, 9, 3, 37, 5),  # SmolLM2's 9/3 heads, N odd and not a multiple of G
    (3, 9, 3, 36, None),  # batch 3, default G
    (3, 8, 4, 40, 6),  # batch 3, a last partial chunk
    (1, 2, 1, 30, 7),  # fewer heads than groups
    (3, 3, 3, 23, 8),
    (1, 16, 4, 41, None),  # N = 4G + 1: a one-token last chunk
    (1, 4, 2, 2, 1),
    (1, 4, 4, 1, None),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def specs_for(pattern: str, chunk_size):
    specs = [resolve_pattern(pattern, chunk_size=chunk_size)]
    if pattern == "sda":
        specs += [resolve_pattern(pattern, chunk_size=chunk_size, dilation=r) for r in (3, 4)]
    return specs


def qkv(batch, heads, kv_heads, n, dim=8, seed=0, transformers_layout=True):
    generator = torch.Generator().manual_seed(seed)

    def make(h):
        if transformers_layout:
            return torch.randn(batch, n, h, dim, generator=generator).transpose(1, 2)
        return torch.randn(batch, h, n, dim, generator=generator)

    return make(heads), make(kv_heads), make(kv_heads)


# -- the layout, pair by pair --------------------------------------------------------------
def mask_from_plan(plan, batch, heads, kv_heads, n) -> torch.Tensor:
    """bool [B, H, N, N] rebuilt from the plan's row numbers: which (query, key) pairs its
    kept segments hold (padding rows, -1, hold none). Also checks that every key row reads
    the key/value head of its query head, in its own window."""
    mask = torch.zeros(batch, heads, n, n, dtype=torch.bool)
    per_kv = heads // kv_heads
    for call in plan.calls:
        cu_q, cu_k = call.cu_q.tolist(), call.cu_k.tolist()
        for index in range(call.segments):
            assert cu_q[index + 1] - cu_q[index] <= call.max_q and cu_k[index + 1] - cu_k[index] <= call.max_k
            if not call.kept[index]:
                continue
            q_rows = call.q_rows[cu_q[index]:cu_q[index + 1]]
            k_rows = call.k_rows[cu_k[index]:cu_k[index + 1]]
            pairs = torch.ones(len(q_rows), len(k_rows), dtype=torch.bool)
            if call.causal:
                assert len(q_rows) == len(k_rows)
                pairs = pairs.tril()
            # padding only ever follows the real rows of a segment
            assert torch.equal(q_rows >= 0, (q_rows >= 0).sort(descending=True).values)
            pairs &= (q_rows >= 0)[:, None] & (k_rows >= 0)[None, :]
            q_rows, k_rows = q_rows.clamp(min=0), k_rows.clamp(min=0)
            token, head = q_rows // heads, q_rows % heads
            key_token, kv_head = k_rows // kv_heads, k_rows % kv_heads
            real_q, real_k = pairs.any(1), pairs.any(0)
            assert (head[real_q] == head[0]).all() and (kv_head[real_k] == head[0] // per_kv).all()
            window = token[0] // n
            assert (token[real_q] // n == window).all() and (key_token[real_k] // n == window).all()
            queries, keys = (token % n)[:, None], (key_token % n)[None, :]
            assert not mask[window, head[0], queries.expand_as(pairs)[pairs], keys.expand_as(pairs)[pairs]].any()
            mask[window, head[0], queries.expand_as(pairs)[pairs], keys.expand_as(pairs)[pairs]] = True
    return mask


@pytest.mark.parametrize("pattern", PRESETS + MIXES)
@pytest.mark.parametrize("batch,heads,kv_heads,n,chunk_size", SHAPES)
def test_segments_hold_exactly_the_reference_pairs(pattern, batch, heads, kv_heads, n, chunk_size):
    for spec in specs_for(pattern, chunk_size):
        plan = build_plan(spec, n, heads, kv_heads, batch)
        expected = build_mask(spec, n, heads).expand(batch, heads, n, n)
        assert torch.equal(mask_from_plan(plan, batch, heads, kv_heads, n), expected), spec.to_dict()
        # one causal call, plus one non-causal call only where a cross rule reaches back
        reaching = any(rule.kind == "cross" and 0 < rule.distance < -(-n // spec.chunk_for(n))
                       for _, _, rule in spec.head_groups(n, heads))
        assert [call.causal for call in plan.calls] == [True] + ([False] if reaching else [])


def test_layout_of_each_rule():
    """The segment lengths the module docstring promises, written out by hand."""
    def lengths(rule, n, chunk):
        layout = head_layout(rule, n, chunk)
        reach = layout.reach or (None, (), ())
        return list(layout.causal), list(reach[1]), list(reach[2])

    assert lengths(Rule("causal"), 10, 4) == ([10], [], [])
    assert lengths(Rule("local"), 10, 4) == ([4, 4, 2], [], [])
    assert lengths(Rule("shifted"), 10, 4) == ([2, 4, 4], [], [])  # S2: G/2, G, ..., the rest
    assert lengths(Rule("shifted", shift=1), 10, 4) == ([3, 4, 3], [], [])
    # cross: the near chunks, then the far queries' rows in short discarded segments
    assert lengths(Rule("cross", distance=1), 10, 4) == ([4, 6], [4, 2], [4, 4])
    assert head_layout(Rule("cross", distance=1), 10, 4).discarded == (False, True)
    assert lengths(Rule("cross", distance=1), 300, 100) == ([100, WASTE_RUN, 200 - WASTE_RUN], [100, 100], [100, 100])
    assert lengths(Rule("cross", distance=2), 10, 4) == ([4, 4, 2], [2], [4])
    assert lengths(Rule("cross", distance=3), 10, 4) == ([4, 4, 2], [], [])  # no chunk 3 back: local
    # dilated(3, 2) on 10 tokens: classes of 4 rows (padded); class 2 sees class 0; classes
    # 0 and 1 see classes 1 and 2 strictly earlier, after their first query, which attends itself
    assert lengths(Rule("dilated", rate=3, offset=2), 10, 4) == ([1, 3, 1, 3, 4], [], [])
    assert head_layout(Rule("dilated", rate=3, offset=2), 10, 4).rows(10) == 12
    assert lengths(Rule("dilated", rate=1, offset=0), 10, 4) == ([10], [], [])


def test_rows_of_a_dilated_head_written_out():
    """dilated(3, 1) on 7 tokens, one head: query classes 0 / 1 / 2 = positions 0 3 6 / 1 4 pad /
    2 5 pad; key rows: class 0 its own first key then class 2 (2, 5), class 1 sees class 0, class 2 class 1."""
    plan = build_plan(resolve_pattern("dilated(3,1)"), 7, 1, 1, 1)
    (call,) = plan.calls
    assert call.q_rows.tolist() == [0, 3, 6, 1, 4, -1, 2, 5, -1]
    assert call.k_rows.tolist() == [0, 2, 5, 0, 3, 6, 1, 4, -1]
    assert call.cu_q.tolist() == [0, 1, 3, 6, 9]


def test_plans_are_cached_per_case():
    packing.clear_cache()
    spec = resolve_pattern("longmixed")
    first = packing.packed_plan(spec, 32, 4, 2, 1, torch.device("cpu"))
    assert packing.packed_plan(spec, 32, 4, 2, 1, torch.device("cpu")) is first
    # an equal spec read separately (as each attention layer does) shares the plan
    assert packing.packed_plan(resolve_pattern("longmixed"), 32, 4, 2, 1, torch.device("cpu")) is first
    assert packing.packed_plan(spec, 32, 4, 2, 2, torch.device("cpu")) is not first
    packing.clear_cache()
    assert packing.packed_plan(spec, 32, 4, 2, 1, torch.device("cpu")) is not first
    # the cached plans carry no row numbers (host memory); the plan's layout is the same
    assert all(len(call.q_rows) == 0 for call in first.calls)
    built = build_plan(spec, 32, 4, 2, 1)
    assert [torch.equal(a.cu_q, b.cu_q) for a, b in zip(first.calls, built.calls)] == [True] * len(built.calls)


# -- the CPU varlen kernel -----------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_segment_kernel_equals_a_block_diagonal_mask(causal):
    generator = torch.Generator().manual_seed(3)
    q_len = torch.tensor([5, 1, 7, 5, 3, 7])
    k_len = q_len if causal else torch.tensor([2, 4, 7, 9, 1, 3])
    cu_q = torch.cat([torch.zeros(1, dtype=torch.long), q_len.cumsum(0)]).int()
    cu_k = torch.cat([torch.zeros(1, dtype=torch.long), k_len.cumsum(0)]).int()
    q = torch.randn(int(q_len.sum()), 2, 8, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(int(k_len.sum()), 2, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    got = packed.segment_attention(q, k, v, cu_q, cu_k, 7, int(k_len.max()), causal, 0.4)
    expected = masked_varlen(q, k, v, cu_q, cu_k, 7, int(k_len.max()), causal, 0.4)
    assert got.shape == q.shape and torch.allclose(got, expected, atol=1e-12, rtol=0)


def test_segment_kernel_refuses_what_the_flash_kernel_would_misread():
    q = torch.zeros(6, 1, 8)
    with pytest.raises(ValueError, match="causal segment 0 has 2 queries but 3 keys"):
        packed.segment_attention(q[:2], q[:3], q[:3], torch.tensor([0, 2]), torch.tensor([0, 3]), 2, 3, True, 1.0)
    with pytest.raises(ValueError, match="longer than max_q"):
        packed.segment_attention(q, q, q, torch.tensor([0, 6]), torch.tensor([0, 6]), 5, 6, True, 1.0)


# -- the whole path against the reference ------------------------------------------------------
@pytest.mark.parametrize("pattern", PRESETS + MIXES)
@pytest.mark.parametrize("batch,heads,kv_heads,n,chunk_size", SHAPES)
def test_packed_equals_reference(pattern, batch, heads, kv_heads, n, chunk_size):
    q, k, v = qkv(batch, heads, kv_heads, n, seed=n + heads)
    for spec in specs_for(pattern, chunk_size):
        expected = masked_attention(q, k, v, build_mask(spec, n, heads), 0.3)
        out = packed_pattern_attention(q, k, v, spec, 0.3)
        assert out.shape == (batch, heads, n, 8) and out.dtype == torch.float32
        assert (out - expected).abs().max().item() <= TOLERANCE, spec.to_dict()


@pytest.mark.parametrize("name", ["s2", "scca_fixed", "scca_flow", "sda", "sda4", "longmixed", "custom"])
@pytest.mark.parametrize("batch,n,heads,kv_heads", [(1, 256, 8, 4), (2, 131, 9, 3)])
def test_packed_matches_the_float64_rule_reference(name, batch, n, heads, kv_heads):
    """A second yardstick: the mask straight from Rule.allows, float64 softmax."""
    spec = spec_named(name)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2)
               for x in random_qkv(batch, heads, kv_heads, n, 16, seed=n))
    out = packed_pattern_attention(q, k, v, spec, 0.3)
    assert torch.allclose(out.double(), dense_attention(q, k, v, dense_mask(spec, n, heads), 0.3), atol=1e-5, rtol=0)


def test_packed_with_the_block_diagonal_kernel_and_contiguous_inputs():
    """The layout does not depend on the CPU kernel's grouping: the masked-SDPA kernel gives
    the same result, also for [B, H, N, D] inputs (a reshape copies them)."""
    q, k, v = qkv(3, 9, 3, 37, transformers_layout=False)
    for pattern in ("longmixed", "scca_flow", MIXES[0]):
        spec = resolve_pattern(pattern, chunk_size=5)
        expected = masked_attention(q, k, v, build_mask(spec, 37, 9), 0.3)
        out = packed_pattern_attention(q, k, v, spec, 0.3, kernel=masked_varlen)
        assert (out - expected).abs().max().item() <= TOLERANCE, pattern


def test_result_is_a_view_of_the_transformers_layout():
    q, k, v = qkv(2, 9, 3, 37)
    out = packed_pattern_attention(q, k, v, resolve_pattern("longmixed", chunk_size=5), 0.3)
    assert out.transpose(1, 2).is_contiguous()


def _compiled_against_eager(with_gradients: bool):
    spec = resolve_pattern("scca_fixed", chunk_size=5)  # a causal and a non-causal call
    q, k, v = (x.detach().requires_grad_(with_gradients) for x in qkv(2, 4, 2, 23))

    def attention(q, k, v):
        return packed_pattern_attention(q, k, v, spec, 0.3, kernel=masked_varlen)

    expected = attention(q, k, v)
    got = torch.compile(attention, fullgraph=True, dynamic=False)(q, k, v)
    assert torch.allclose(got, expected, atol=1e-6)
    if with_gradients:
        expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
        for a, b in zip(torch.autograd.grad(got.square().sum(), (q, k, v)), expected_grads):
            assert torch.allclose(a, b, atol=1e-5)


def test_compiled_in_one_graph():
    """With its plan cached, the packed path traces into one graph (no host sync, no break)."""
    _compiled_against_eager(with_gradients=False)


@pytest.mark.slow
def test_compiled_in_one_graph_with_gradients():
    """The same with the backward (the float32 key/value gradient sum included): compiles the backward too."""
    _compiled_against_eager(with_gradients=True)


def test_compiled_builds_a_missing_plan_eagerly():
    """A plan not yet cached is built outside the graph (it reads tensors back to the host),
    so that compiled training can start with an empty cache."""
    packing.clear_cache()
    spec = resolve_pattern("longmixed", chunk_size=5)
    q, k, v = (x.detach().requires_grad_(True) for x in qkv(1, 9, 3, 23))

    def attention(q, k, v):
        return packed_pattern_attention(q, k, v, spec, 0.3, kernel=masked_varlen)

    got = torch.compile(attention, dynamic=False)(q, k, v)
    gradients = torch.autograd.grad(got.square().sum(), (q, k, v))
    expected = attention(q, k, v)
    assert torch.allclose(got, expected, atol=1e-6)
    for a, b in zip(gradients, torch.autograd.grad(expected.square().sum(), (q, k, v))):
        assert torch.allclose(a, b, atol=1e-5)


def test_rejects_mismatched_shapes():
    q, k, v = qkv(1, 6, 4, 32)
    with pytest.raises(ValueError, match="share"):
        packed_pattern_attention(q, k, v, resolve_pattern("s2"), 1.0)
    q, k, v = qkv(1, 4, 2, 32)
    with pytest.raises(ValueError, match="as many keys"):
        packed_pattern_attention(q, k[:, :, :16], v[:, :, :16], resolve_pattern("s2"), 1.0)


# -- inside a model ---------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["s2", "scca_flow", "longmixed", MIXES[0]])
def test_model_packed_equals_reference(pattern):
    model = tiny_llama(heads=9, kv_heads=3, head_dim=8, seed=1)
    ids = token_batch(batch=3, n=37)
    spec = resolve_pattern(pattern, chunk_size=None if pattern in PRESETS else 5)
    packed_model, reference_model = copy.deepcopy(model), copy.deepcopy(model)
    apply_pattern(packed_model, spec, backend="packed")
    apply_pattern(reference_model, spec, backend="reference")
    reset_call_counts()
    out = logits(packed_model, ids)
    assert call_counts() == {"packed": model.config.num_hidden_layers}
    expected = logits(reference_model, ids)
    assert torch.allclose(out, expected, atol=1e-4), (out - expected).abs().max()
    assert (expected - logits(model, ids)).abs().max() > 1e-3  # and the pattern matters
    reset_call_counts()


# -- auto's choice ----------------------------------------------------------------------------
def entry(**fields):
    base = {"device": "cuda-sm90", "heads": 9, "kv_heads": 3, "head_dim": 64, "n": 16384,
            "pattern": auto.pattern_key(resolve_pattern("s2")), "mode": "fwd", "backend": "strided"}
    return {**base, **fields}


def case(**fields):
    base = {"device_kind": "cuda-sm90", "heads": 9, "kv_heads": 3, "head_dim": 64, "n": 16384,
            "pattern": auto.pattern_key(resolve_pattern("s2")), "mode": "fwd"}
    return auto.Case(**{**base, **fields})


def test_table_lookup_takes_the_nearest_measured_length_within_a_factor_two():
    entries = [entry(n=8192, backend="flex"), entry(n=32768, backend="packed"), entry(n=16384, mode="fwd+bwd")]
    assert auto.table_choice(case(n=8192), entries) == "flex"
    assert auto.table_choice(case(n=11000), entries) == "flex"
    assert auto.table_choice(case(n=24000), entries) == "packed"
    assert auto.table_choice(case(n=65536), entries) == "packed"
    assert auto.table_choice(case(n=65537), entries) is None  # beyond twice the longest
    assert auto.table_choice(case(n=4095), entries) is None
    assert auto.table_choice(case(mode="fwd+bwd"), entries) == "strided"
    for other in (dict(heads=32), dict(kv_heads=9), dict(head_dim=128), dict(device_kind="cuda-sm80"),
                  dict(pattern=auto.pattern_key(resolve_pattern("s2", chunk_size=1024)))):
        assert auto.table_choice(case(**other), entries) is None, other


def test_pattern_key_names_the_groups_and_the_chunk_setting():
    assert auto.pattern_key(resolve_pattern("s2")) == "1/2 local + 1/2 shifted @ G=N*1/4"
    assert auto.pattern_key(resolve_pattern("1/2 local + 1/2 shifted")) == auto.pattern_key(resolve_pattern("s2"))
    assert auto.pattern_key(resolve_pattern("sda", dilation=4, chunk_size=64)) == (
        "1/4 dilated(4,0) + 1/4 dilated(4,1) + 1/4 dilated(4,2) + 1/4 dilated(4,3) @ G=64")


def test_auto_rule_without_measurements():
    sparse, full = resolve_pattern("s2"), resolve_pattern("full")
    assert resolve_backend(full, torch.device("cuda", 0)) == "sdpa"
    assert resolve_backend(full, torch.device("cpu")) == "sdpa"
    assert resolve_backend(sparse, torch.device("cpu")) == "chunked"
    assert resolve_backend(sparse, torch.device("cuda", 0)) == ("packed" if packed.varlen_available() else "strided")
    cuda = torch.device("cuda", 0)
    assert auto.fallback_choice(cuda, varlen_ok=True, mode="fwd+bwd") == "packed"
    assert auto.fallback_choice(cuda, varlen_ok=False, mode="fwd+bwd") == "strided"
    # forward alone: strided, whether or not FlashAttention would take the inputs
    assert auto.fallback_choice(cuda, varlen_ok=True, mode="fwd") == "strided"
    assert auto.fallback_choice(cuda, varlen_ok=False, mode="fwd") == "strided"
    assert auto.fallback_choice(torch.device("cpu"), varlen_ok=True, mode="fwd") == "chunked"
    q, k, v = qkv(1, 4, 2, 16)
    assert resolve_backend(sparse, q.device, "auto", (q, k, v)) == "chunked"  # no table off CUDA


def test_auto_on_cuda_reads_the_table_and_falls_back(monkeypatch):
    """auto's decision for CUDA inputs, with the device's facts faked on this machine."""

    class OnCuda:  # what _decide reads of a tensor: its shape and device
        def __init__(self, *shape):
            self.shape, self.device = shape, torch.device("cuda", 0)

    q, k = OnCuda(1, 9, 16384, 64), OnCuda(1, 3, 16384, 64)
    monkeypatch.setattr(auto, "device_kind", lambda device: "cuda-sm90")
    entries = [entry(backend="flex"), entry(mode="fwd+bwd", backend="packed")]
    for varlen_ok in (True, False):
        monkeypatch.setattr(auto, "varlen_supported", lambda q, ok=varlen_ok: ok)
        training_rule = "packed" if varlen_ok else "strided"
        assert auto._decide(resolve_pattern("s2"), q, k, 16384, "fwd", entries) == "flex"
        # packed was measured fastest, but inputs that FlashAttention does not take get the rule
        assert auto._decide(resolve_pattern("s2"), q, k, 16384, "fwd+bwd", entries) == training_rule
        # not measured: the rule, by mode
        assert auto._decide(resolve_pattern("sda"), q, k, 16384, "fwd", entries) == "strided"
        assert auto._decide(resolve_pattern("sda"), q, k, 16384, "fwd+bwd", entries) == training_rule
        assert auto._decide(resolve_pattern("s2"), q, k, 65537, "fwd", entries) == "strided"
        assert auto._decide(resolve_pattern("s2"), q, k, 65537, "fwd+bwd", entries) == training_rule


def test_auto_chooses_for_the_pinned_length_within_choosing_for_length(monkeypatch):
    """Inside ``choosing_for_length(n)`` auto looks the case up at n whatever the inputs' length
    (the step plan's short probes then run the long window's kernel); outside, at their own."""
    looked_up = []

    def decide(spec, q, k, n, mode, entries):
        looked_up.append(n)
        return f"backend for {n}"

    monkeypatch.setattr(auto, "_decide", decide)
    monkeypatch.setattr(auto, "_choices", {})
    spec = resolve_pattern("s2")
    q, k, v = qkv(1, 4, 2, 64)
    with auto.choosing_for_length(16384):
        assert auto.choose(spec, q, k, v) == "backend for 16384"
        with auto.choosing_for_length(4096):
            assert auto.choose(spec, q, k, v) == "backend for 4096"
        assert auto.choose(spec, q, k, v) == "backend for 16384"
    assert auto.choose(spec, q, k, v) == "backend for 64"  # the pinned choice is not cached for n=64
    assert looked_up == [16384, 4096, 64]


def test_mode_follows_autograd():
    q, k, _ = qkv(1, 4, 2, 8)
    assert auto.mode_of(q, k) == "fwd"
    assert auto.mode_of(q.detach().requires_grad_(), k) == "fwd+bwd"
    with torch.no_grad():
        assert auto.mode_of(q.detach().requires_grad_(), k) == "fwd"


def test_dispatch_runs_and_counts_packed():
    reset_call_counts()
    q, k, v = qkv(2, 9, 3, 29)
    for name in PRESETS[1:]:
        spec = resolve_pattern(name)
        expected = masked_attention(q, k, v, build_mask(spec, 29, 9), 0.3)
        out = pattern_attention(q, k, v, spec, 0.3, backend="packed")
        assert (out - expected).abs().max().item() <= TOLERANCE, name
    assert call_counts() == {"packed": len(PRESETS) - 1}
    reset_call_counts()


def test_table_written_from_a_bench_result_merges_by_case(tmp_path):
    spec = resolve_pattern("s2")
    result = {"device": "NVIDIA H200", "heads": 9, "kv_heads": 3, "head_dim": 64, "dtype": "bfloat16",
              "torch": "2.11", "pattern_keys": {"s2": auto.pattern_key(spec)}, "rows": [
                  {"n": 16384, "pattern": "s2", "backend": "strided", "mode": "fwd", "ms": 0.9},
                  {"n": 16384, "pattern": "s2", "backend": "packed", "mode": "fwd", "ms": 0.5},
                  {"n": 16384, "pattern": "s2", "backend": "auto", "mode": "fwd", "ms": 0.1},  # not a table backend
                  {"n": 16384, "pattern": "s2", "backend": "flex", "mode": "fwd", "ms": None},  # failed
                  {"n": 16384, "pattern": "s2", "backend": "strided", "mode": "fwd+bwd", "ms": 2.0},
                  {"n": 16384, "pattern": "s2", "backend": "packed", "mode": "fwd+bwd", "ms": 2.5}]}
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"about": "kept", "entries": [
        entry(n=8192, backend="flex"),
        entry(n=16384, backend="chunked", device_name="NVIDIA H100", ms={"chunked": 0.1}),  # another GPU: replaced
        entry(n=16384, mode="fwd+bwd", backend="flex", device_name="NVIDIA H200", ms={"flex": 1.5, "packed": 3.0})]}))
    assert auto.write_table(path, result, "cuda-sm90") == 2
    table = json.loads(path.read_text())
    assert table["about"] == "kept"
    chosen = {(e["n"], e["mode"]): e["backend"] for e in table["entries"]}
    # fwd+bwd on the same GPU: flex's earlier 1.5 ms stays and wins, packed's time is the new one
    assert chosen == {(8192, "fwd"): "flex", (16384, "fwd"): "packed", (16384, "fwd+bwd"): "flex"}
    combined = next(e for e in table["entries"] if e["mode"] == "fwd+bwd")
    assert combined["ms"] == {"flex": 1.5, "packed": 2.5, "strided": 2.0}
    assert next(e for e in table["entries"] if e["n"] == 16384 and e["mode"] == "fwd")["ms"] == {
        "strided": 0.9, "packed": 0.5}
    assert auto.table_choice(case(n=16384), table["entries"]) == "packed"


def test_the_packaged_table_is_readable():
    table = auto.read_table()
    assert isinstance(table["entries"], list)
    for item in table["entries"]:
        assert item["backend"] in auto.TABLE_BACKENDS and item["mode"] in auto.MODES


# -- GPU (skipped without one) ----------------------------------------------------------------------
def _count_flash_calls(monkeypatch) -> list:
    calls = []
    real = packed.flash_varlen

    def spy(*args, **kwargs):
        calls.append(args[7])  # causal
        return real(*args, **kwargs)

    monkeypatch.setattr(packed, "flash_varlen", spy)
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_flash_varlen_equals_the_segment_kernel(causal):
    """The kernel adapter alone (keywords, causal alignment, scale) on uneven segments, bf16."""
    assert packed.varlen_available(), f"torch {torch.__version__} has no usable varlen_attn"
    generator = torch.Generator(device="cuda").manual_seed(5)
    q_len = torch.tensor([300, 1, 129, 64, 700])
    k_len = q_len if causal else torch.tensor([256, 3, 512, 64, 17])
    cu_q = torch.cat([torch.zeros(1, dtype=torch.long), q_len.cumsum(0)]).int().cuda()
    cu_k = torch.cat([torch.zeros(1, dtype=torch.long), k_len.cumsum(0)]).int().cuda()
    q = torch.randn(int(q_len.sum()), 1, 64, generator=generator, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(int(k_len.sum()), 1, 64, generator=generator, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    args = (cu_q, cu_k, int(q_len.max()), int(k_len.max()), causal, 0.1)
    got = packed.flash_varlen(q, k, v, *args)
    expected = packed.segment_attention(q.double(), k.double(), v.double(), *args)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert float((got.double() - expected).norm() / expected.norm()) < BF16_REL_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("name", PRESETS + ["sda-r4", "custom"])
@pytest.mark.parametrize("heads,kv_heads,head_dim,n", [(32, 8, 128, 2048), (9, 3, 64, 1030)])
def test_gpu_packed_bf16_matches_reference(monkeypatch, name, heads, kv_heads, head_dim, n):
    specials = {"custom": CUSTOM, "sda-r4": resolve_pattern("sda", dilation=4)}
    spec = specials[name] if name in specials else resolve_pattern(name)
    calls = _count_flash_calls(monkeypatch)
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2)
               for x in random_qkv(2, heads, kv_heads, n, head_dim, dtype=torch.bfloat16, device="cuda", seed=2))
    ref = dense_attention(q, k, v, dense_mask(spec, n, heads).cuda(), head_dim ** -0.5)
    out = packed_pattern_attention(q, k, v, spec, head_dim ** -0.5)
    assert calls and len(calls) <= 2, "FlashAttention's varlen kernel did not run"
    assert torch.isfinite(out).all()
    assert float((out.double() - ref).norm() / ref.norm()) < BF16_REL_TOL


@pytest.mark.gpu
def test_gpu_model_packed_equals_reference():
    """A whole bf16 model under the packed kernel is as close to the float32 model under the
    dense reference mask as the same bf16 model under that reference is: the kernel adds no
    error of its own beyond bf16 rounding (two layers of bf16 already differ by about 1%)."""
    model = tiny_llama(heads=9, kv_heads=3, head_dim=16, seed=1).cuda()
    ids = token_batch(batch=2, n=250).cuda()
    spec = resolve_pattern("longmixed", chunk_size=40)
    exact = copy.deepcopy(model)
    apply_pattern(exact, spec, backend="reference")
    expected = logits(exact, ids).double()
    errors = {}
    for backend in ("packed", "reference"):
        patterned = copy.deepcopy(model).to(torch.bfloat16)
        apply_pattern(patterned, spec, backend=backend)
        errors[backend] = float((logits(patterned, ids).double() - expected).norm() / expected.norm())
    assert errors["packed"] < max(BF16_REL_TOL, 1.5 * errors["reference"]), errors
