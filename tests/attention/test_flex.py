"""The FlexAttention fast path against a dense reference written here.

The reference is built straight from Rule.allows and PatternSpec.head_rules and
plain float64 softmax, so it shares no code with the fast path beyond the rule
table itself.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import BF16_REL_TOL, dense_attention, dense_mask, random_qkv, spec_named

from scca_eval.attention import flex
from scca_eval.attention.flex import flex_pattern_attention
from scca_eval.patterns import preset

PRESETS = ["full", "s2", "scca_fixed", "scca_flow", "sda", "longmixed"]


@pytest.mark.parametrize("name", PRESETS + ["sda4", "custom"])
@pytest.mark.parametrize("n,heads,kv_heads", [(200, 6, 3), (131, 9, 3)])
@pytest.mark.parametrize("repeat_kv", [False, True])
def test_matches_dense_reference_fp32(name, n, heads, kv_heads, repeat_kv):
    spec = spec_named(name)
    q, k, v = random_qkv(2, heads, kv_heads, n, 16, seed=n + heads)
    out = flex_pattern_attention(q, k, v, spec, 0.3, block_size=32, repeat_kv=repeat_kv)
    ref = dense_attention(q, k, v, dense_mask(spec, n, heads), 0.3)
    assert out.shape == (2, heads, n, 16) and out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["longmixed", "custom"])
@pytest.mark.parametrize("split", [True, False])
def test_split_and_single_layouts_give_the_same_output(name, split):
    spec = spec_named(name)
    q, k, v = random_qkv(1, 16, 4, 160, 8, seed=3)
    ref = dense_attention(q, k, v, dense_mask(spec, 160, 16), 0.5)
    out = flex_pattern_attention(q, k, v, spec, 0.5, block_size=32, split_layouts=split)
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=0)
    parts = flex._plans.newest().parts
    dilated = [rule.kind == "dilated" for rule in spec.head_rules(160, 16)]
    runs = 1 + sum(a != b for a, b in zip(dilated, dilated[1:]))  # longmixed: 2, custom: 3
    assert len(parts) == (runs if split else 1)
    # split: only the dilated runs are reordered; one call: everything is
    assert all((part.order is not None) == (dilated[part.first] or not split) for part in parts)


def test_repeated_key_value_heads_let_the_layouts_split_inside_a_group(monkeypatch):
    # longmixed at 9 query over 3 key/value heads: dilated and chunk heads share a group, so
    # with enable_gqa the heads stay in one call; repeated per query head they split.
    spec = preset("longmixed")
    q, k, v = random_qkv(1, 9, 3, 160, 8, seed=4)
    dilated = [rule.kind == "dilated" for rule in spec.head_rules(160, 9)]
    runs = 1 + sum(a != b for a, b in zip(dilated, dilated[1:]))
    assert runs > 1 and any(len(set(dilated[g:g + 3])) > 1 for g in range(0, 9, 3))  # a group mixes
    ref = dense_attention(q, k, v, dense_mask(spec, 160, 9), 0.5)
    for repeat_kv, calls in ((False, 1), (True, runs)):
        out = flex_pattern_attention(q, k, v, spec, 0.5, block_size=32, split_layouts=True, repeat_kv=repeat_kv)
        assert torch.allclose(out.double(), ref, atol=1e-5, rtol=0)
        assert len(flex._plans.newest().parts) == calls
    # By default only a call whose gradients will be taken repeats them (a forward alone gains
    # nothing); FlexAttention has no backward here, so this forward keeps the group.
    monkeypatch.setattr(flex, "DEFAULT_REPEAT_KV", True)
    flex.clear_cache()
    flex_pattern_attention(q, k, v, spec, 0.5, block_size=32, split_layouts=True)
    assert len(flex._plans.newest().parts) == 1


def test_transformers_memory_layout_is_accepted():
    # transformers hands attention [B, N, H, D] tensors transposed to [B, H, N, D].
    spec = preset("longmixed")
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in random_qkv(1, 8, 8, 96, 8, seed=5))
    out = flex_pattern_attention(q, k, v, spec, 0.4, block_size=32)
    assert torch.allclose(out.double(), dense_attention(q, k, v, dense_mask(spec, 96, 8), 0.4), atol=1e-5)


def kernel_view(block_mask, n: int) -> torch.Tensor:
    """The [H, N, N] mask the compiled kernel applies: full blocks unmasked,
    partial blocks through mask_mod, every other block skipped."""
    block_q, block_k = block_mask.BLOCK_SIZE
    _, heads, nq = block_mask.kv_num_blocks.shape
    pos = torch.arange(n)
    mask = torch.zeros(heads, n, n, dtype=torch.bool)
    for h in range(heads):
        exact = block_mask.mask_mod(0, torch.tensor(h), pos[:, None], pos[None, :])
        for i in range(nq):
            rows = slice(i * block_q, (i + 1) * block_q)
            for count, indices, is_full in ((block_mask.full_kv_num_blocks, block_mask.full_kv_indices, True),
                                            (block_mask.kv_num_blocks, block_mask.kv_indices, False)):
                for j in indices[0, h, i, :count[0, h, i]].tolist():
                    cols = slice(j * block_k, (j + 1) * block_k)
                    assert not mask[h, rows, cols].any(), "a block listed twice"
                    mask[h, rows, cols] = True if is_full else exact[rows, cols]
    return mask


@pytest.mark.parametrize("name", PRESETS + ["sda4", "custom"])
@pytest.mark.parametrize("n,heads,block", [(192, 6, 32), (150, 9, 16), (128, 4, (32, 64))])
def test_block_mask_reproduces_the_pattern(name, n, heads, block):
    """Skipped, full and partial blocks together give exactly the pattern.

    The eager kernel on CPU ignores the block structure, so this checks what the
    compiled kernel would compute."""
    spec = spec_named(name)
    block = (block, block) if isinstance(block, int) else block
    plan = flex._plan(spec, n, heads, 1, torch.device("cpu"), block, False)
    (part,) = plan.parts
    mask = kernel_view(part.block_mask, n)
    expected = dense_mask(spec, n, heads)
    if part.order is not None:  # the kernel works in the residue layout
        expected = expected[:, part.order][:, :, part.order]
    assert torch.equal(mask, expected)


def test_sparse_patterns_skip_blocks():
    # A block mask that lists every block would be correct but slow.
    n, heads = 1024, 8
    for name, most in [("s2", 0.35), ("scca_fixed", 0.45), ("sda", 0.6), ("longmixed", 0.5)]:
        plan = flex._plan(preset(name), n, heads, 1, torch.device("cpu"), (64, 64), False)
        bm = plan.parts[0].block_mask
        listed = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum())
        causal_blocks = heads * (n // 64) * (n // 64 + 1) // 2
        assert listed <= most * causal_blocks, name


def test_residue_layout_only_for_dilated_rules():
    plan = flex._plan(preset("s2"), 256, 8, 1, torch.device("cpu"), (32, 32), False)
    assert plan.parts[0].order is None
    plan = flex._plan(preset("longmixed"), 256, 8, 1, torch.device("cpu"), (32, 32), False)
    order = plan.parts[0].order
    assert order[:4].tolist() == [0, 4, 8, 12] and order[64:66].tolist() == [1, 5]  # lcm(2, 4) = 4


@pytest.mark.parametrize("n", [256, 254])  # a multiple of the modulus (a transposed copy) and not (a gather)
def test_residue_layout_moves_tokens_to_the_plan_order_and_back(n):
    part = flex._plan(preset("longmixed"), n, 8, 1, torch.device("cpu"), (32, 32), False).parts[0]
    x = torch.randn(2, n, 8, 16).transpose(1, 2)  # transformers' memory layout
    moved = flex._to_residue_layout(x, part)
    assert torch.equal(moved, x[:, :, part.order])
    assert torch.equal(flex._from_residue_layout(moved, part), x)


def test_plans_are_cached_per_length_and_heads():
    flex.clear_cache()
    q, k, v = random_qkv(1, 4, 4, 64, 8)
    flex_pattern_attention(q, k, v, preset("s2"), 1.0, block_size=16)
    flex_pattern_attention(q, k, v, preset("s2"), 1.0, block_size=16)
    assert len(flex._plans) == 1
    q, k, v = random_qkv(1, 4, 4, 80, 8)
    flex_pattern_attention(q, k, v, preset("s2"), 1.0, block_size=16)
    assert len(flex._plans) == 2


def test_rejects_mismatched_shapes():
    q, k, v = random_qkv(1, 6, 4, 32, 8)
    with pytest.raises(ValueError, match="share"):
        flex_pattern_attention(q, k, v, preset("s2"), 1.0)
    with pytest.raises(ValueError, match="as many keys"):
        flex_pattern_attention(q, k[:, :, :16], v[:, :, :16], preset("s2"), 1.0)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SCCA_EVAL_COMPILE_TESTS"),
                    reason="compiling the CPU kernel takes 1-2 minutes; set SCCA_EVAL_COMPILE_TESTS=1")
def test_compiled_kernel_on_cpu():
    """The compiled kernel, which does use the block mask, on CPU."""
    for name in ("s2", "longmixed"):
        spec = preset(name)
        q, k, v = random_qkv(1, 8, 4, 256, 16, seed=7)
        out = flex_pattern_attention(q, k, v, spec, 0.25, compile=True)
        ref = dense_attention(q, k, v, dense_mask(spec, 256, 8), 0.25)
        assert torch.allclose(out.double(), ref, atol=1e-5, rtol=0)


# -- GPU ------------------------------------------------------------------------
# Tolerance in bf16: the relative error ||out - ref|| / ||ref|| against the
# float64 reference must stay below BF16_REL_TOL, and within BF16_SDPA_FACTOR
# times the error that PyTorch's own SDPA makes on full causal attention with
# the same bf16 inputs (the yardstick of what bf16 attention normally loses).
BF16_SDPA_FACTOR = 2.0


def relative_error(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.gpu
@pytest.mark.parametrize("name", PRESETS + ["sda4", "custom"])
@pytest.mark.parametrize("n", [2048, 1000])
def test_gpu_bf16_matches_reference(name, n):
    spec = spec_named(name)
    heads, kv_heads, dim = 32, 8, 128
    q, k, v = random_qkv(1, heads, kv_heads, n, dim, dtype=torch.bfloat16, device="cuda", seed=n)
    scaling = dim ** -0.5
    ref = dense_attention(q, k, v, dense_mask(spec, n, heads).cuda(), scaling)
    out = flex_pattern_attention(q, k, v, spec, scaling)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    causal = dense_attention(q, k, v, dense_mask(preset("full"), n, heads).cuda(), scaling)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
    error, sdpa_error = relative_error(out, ref), relative_error(sdpa, causal)
    assert error < BF16_REL_TOL, (error, sdpa_error)
    assert error < BF16_SDPA_FACTOR * sdpa_error, (error, sdpa_error)


@pytest.mark.gpu
@pytest.mark.parametrize("name", PRESETS + ["sda4", "custom"])
@pytest.mark.parametrize("n", [2048, 1030])
@pytest.mark.parametrize("repeat_kv", [False, True])
def test_gpu_bf16_small_heads_forward_and_backward_match_reference(name, n, repeat_kv):
    """The SmolLM2 head shape (9 query heads over 3 key/value heads, dim 64), where the
    forward kernel runs its own tile on Hopper GPUs: outputs and gradients, with the kernel's
    grouped-query attention and with key/value heads repeated per query head."""
    spec = spec_named(name)
    heads, kv_heads, dim = 9, 3, 64
    q, k, v = random_qkv(1, heads, kv_heads, n, dim, dtype=torch.bfloat16, device="cuda", seed=n + 1)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    scaling = dim ** -0.5
    grad_out = torch.randn(1, heads, n, dim, device="cuda", generator=torch.Generator("cuda").manual_seed(n))
    out = flex_pattern_attention(q, k, v, spec, scaling, repeat_kv=repeat_kv)
    got = torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))
    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = dense_attention(*exact, dense_mask(spec, n, heads).cuda(), scaling)
    expected = torch.autograd.grad(ref, exact, grad_out.double())
    assert relative_error(out.detach(), ref.detach()) < BF16_REL_TOL
    for g, e in zip(got, expected):
        assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()
        assert relative_error(g, e) < BF16_REL_TOL, name


def test_small_head_tiles_only_on_hopper_gpus_at_small_head_dims(monkeypatch):
    """And the device is asked for its compute capability once per device, dtype and head
    dimension: inside a compiled layer that question would break the graph at every call."""
    from types import SimpleNamespace

    assert flex.default_kernel_options(torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)) == {}  # CPU
    asked = []
    capabilities = {0: (9, 0), 1: (8, 0)}
    monkeypatch.setattr(flex, "_kernel_options", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: asked.append(device) or
                        capabilities[device.index])

    def options(index, dim=64, dtype=torch.bfloat16):  # stands in for a query tensor on that GPU
        return flex.default_kernel_options(SimpleNamespace(device=torch.device("cuda", index), dtype=dtype,
                                                           shape=(1, 9, 128, dim)))

    assert options(0) == flex.HOPPER_SMALL_HEAD_TILES and options(0) == options(0)
    assert len(asked) == 1  # cached
    assert options(1) == {} and options(0, dim=128) == {} and options(0, dtype=torch.float32) == {}
    assert len(asked) == 2  # head dimension and dtype decide without asking the device


@pytest.mark.gpu
def test_gpu_compiled_layers_under_flex_have_no_graph_break():
    """A compiled decoder layer under FlexAttention traces as one graph on the GPU (the
    evaluation engine's first batch runs eagerly and builds what the traced layers read)."""
    from torch._dynamo.utils import counters

    from helpers import tiny_llama
    from scca_eval.attention import apply_pattern
    from scca_eval.evaluation.engine import compile_for_evaluation, score_windows
    from scca_eval.evaluation.windows import plan_windows

    model = tiny_llama(heads=9, kv_heads=3, head_dim=64).to("cuda", torch.bfloat16)
    apply_pattern(model, preset("longmixed", chunk_size=64), backend="flex")
    compile_for_evaluation(model)
    documents = [torch.randint(0, model.config.vocab_size, (256 * 3,)).numpy()]
    windows = plan_windows([256 * 3], 256, 256)
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):
        score_windows(model, documents, windows, batch_size=1, window_length=256)
    assert counters["stats"].get("unique_graphs", 0) > 0
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


@pytest.mark.gpu
def test_gpu_fp32_matches_reference():
    spec = preset("longmixed")
    q, k, v = random_qkv(1, 8, 8, 1024, 64, device="cuda", seed=1)
    ref = dense_attention(q, k, v, dense_mask(spec, 1024, 8).cuda(), 0.125)
    out = flex_pattern_attention(q, k, v, spec, 0.125)
    # the kernel's fp32 dot products may run in tf32 on the GPU: 1e-3 relative
    assert relative_error(out, ref) < 1e-3


@pytest.mark.gpu
def test_gpu_flex_stays_compiled_where_the_engine_runs_eagerly():
    """The engine runs a compiled model's odd-shaped batches under the force_eager
    stance; FlexAttention must still run its fused kernel there, not the dense eager one."""
    import warnings

    spec = preset("longmixed")
    q, k, v = random_qkv(1, 16, 4, 1536, 64, dtype=torch.bfloat16, device="cuda", seed=8)
    ref = dense_attention(q, k, v, dense_mask(spec, 1536, 16).cuda(), 0.125)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.compiler.set_stance("force_eager"):
            out = flex_pattern_attention(q, k, v, spec, 0.125)
    # the eager kernel says that it runs unfused
    assert not [w for w in caught if "without torch.compile" in str(w.message)]
    assert relative_error(out, ref) < BF16_REL_TOL


@pytest.mark.gpu
def test_gpu_flex_is_chosen_only_by_name():
    # auto runs a measured or packed layout on CUDA, never FlexAttention; it stays reachable as backend="flex"
    from scca_eval.attention import call_counts, pattern_attention, reset_call_counts

    spec = preset("longmixed")
    q, k, v = random_qkv(1, 16, 4, 1024, 64, dtype=torch.bfloat16, device="cuda", seed=6)
    ref = dense_attention(q, k, v, dense_mask(spec, 1024, 16).cuda(), 0.125)
    reset_call_counts()
    flex_out = pattern_attention(q, k, v, spec, 0.125, backend="flex")
    auto_out = pattern_attention(q, k, v, spec, 0.125)
    counts = call_counts()
    assert counts.get("flex") == 1 and sum(counts.values()) == 2, counts
    reset_call_counts()
    for out in (flex_out, auto_out):
        assert relative_error(out, ref) < BF16_REL_TOL
