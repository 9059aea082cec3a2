"""Pattern attention under autograd: the gradients (w.r.t. q, k and v) of every fast
path against those of the dense reference mask. On CPU in float64 for the backends
that run there (chunked, strided, packed, and the dispatch); on a GPU in bf16 for chunked,
strided, packed (FlashAttention's varlen kernel) and FlexAttention, within the tolerance
the forward documents (tests/attention/test_flex.py).

GPU tests: ``python -m pytest -q -m gpu tests/attention/test_training_attention.py``.
"""

from __future__ import annotations

import pytest
import torch

from helpers import one_thread  # noqa: F401  (a fixture)
from torch.utils._python_dispatch import TorchDispatchMode

from scca_eval.attention import (
    chunked_pattern_attention,
    masked_attention,
    packed_pattern_attention,
    pattern_attention,
    strided_pattern_attention,
)
from scca_eval.attention import strided
from scca_eval.attention.flex import flex_pattern_attention
from scca_eval.errors import UserError
from scca_eval.patterns import PRESET_DESCRIPTIONS, build_mask, resolve_pattern

PRESETS = list(PRESET_DESCRIPTIONS)
MIXES = [
    "1/3 shifted(3) + 1/3 cross(2) + 1/3 dilated(3,2)",
    "1/4 local + 1/4 shifted(3) + 1/2 dilated(3,1)",
]
# float64 sums of a few dozen terms of size ~1 agree to ~1e-15; a wrong gradient is off by ~1e-1
FLOAT64_TOLERANCE = 1e-12


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield

SHAPES = [
    # (batch, heads, kv_heads, n, chunk_size)
    (2, 9, 3, 37, 5),  # SmolLM2's 9/3 heads (groups split key/value heads), N not a multiple of G
    (1, 8, 4, 40, 6),  # aligned head groups, N a multiple of every rate: the strided view layout
    (2, 4, 2, 36, None),  # default G = N/4
    (1, 16, 4, 41, None),  # N = 4G + 1: a one-token last chunk
    (1, 2, 1, 30, 7),  # fewer heads than groups
    (3, 3, 3, 23, 8),  # batch 3, no grouped-query sharing
]

BACKENDS = {
    "chunked": lambda q, k, v, spec, scaling: chunked_pattern_attention(q, k, v, spec, scaling),
    "strided": lambda q, k, v, spec, scaling: strided_pattern_attention(q, k, v, spec, scaling),
    "packed": lambda q, k, v, spec, scaling: packed_pattern_attention(q, k, v, spec, scaling),
}


def specs_for(pattern: str, chunk_size):
    specs = [resolve_pattern(pattern, chunk_size=chunk_size)]
    if pattern == "sda":
        specs.append(resolve_pattern(pattern, chunk_size=chunk_size, dilation=3))
    return specs


def qkv_and_upstream(batch, heads, kv_heads, n, dim=8, dtype=torch.float64, device="cpu", seed=0):
    """q, k, v in transformers' memory layout ([B, N, H, D] seen as [B, H, N, D]) and a
    random upstream gradient for the output."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def make(h):
        return torch.randn(batch, n, h, dim, generator=generator, dtype=dtype, device=device).transpose(1, 2)

    return make(heads), make(kv_heads), make(kv_heads), make(heads)


def gradients(attention, q, k, v, upstream):
    """(output, dq, dk, dv) of ``attention(q, k, v)`` against ``upstream``."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = attention(q, k, v)
    out.backward(upstream)
    return out.detach(), q.grad, k.grad, v.grad


def reference_gradients(q, k, v, upstream, spec, scaling):
    mask = build_mask(spec, q.shape[2], q.shape[1], device=q.device)
    return gradients(lambda q, k, v: masked_attention(q, k, v, mask, scaling), q, k, v, upstream)


def largest_difference(got, expected) -> float:
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(got, expected))


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("pattern", PRESETS + MIXES)
@pytest.mark.parametrize("batch,heads,kv_heads,n,chunk_size", SHAPES)
def test_float64_gradients_equal_the_reference(backend, pattern, batch, heads, kv_heads, n, chunk_size):
    q, k, v, upstream = qkv_and_upstream(batch, heads, kv_heads, n, seed=n + heads)
    for spec in specs_for(pattern, chunk_size):
        expected = reference_gradients(q, k, v, upstream, spec, 0.3)
        got = gradients(lambda q, k, v: BACKENDS[backend](q, k, v, spec, 0.3), q, k, v, upstream)
        assert all(g.dtype == torch.float64 for g in got)
        assert largest_difference(got, expected) <= FLOAT64_TOLERANCE, (backend, spec.to_dict())


@pytest.mark.parametrize("backend", ["auto", "chunked", "strided", "packed", "reference"])
def test_dispatch_gradients_equal_the_reference(backend):
    # what a patterned model calls: pattern_attention with the model's backend
    q, k, v, upstream = qkv_and_upstream(2, 9, 3, 29)
    for name in PRESETS:
        spec = resolve_pattern(name)
        expected = reference_gradients(q, k, v, upstream, spec, 0.3)
        got = gradients(lambda q, k, v: pattern_attention(q, k, v, spec, 0.3, backend=backend), q, k, v, upstream)
        assert largest_difference(got, expected) <= FLOAT64_TOLERANCE, (backend, name)


@pytest.mark.parametrize("pattern,heads,kv_heads,n", [
    ("s2", 8, 4, 40), ("scca_fixed", 8, 4, 40), ("scca_flow", 8, 8, 40), ("sda", 8, 4, 40),
    ("longmixed", 16, 16, 48), (MIXES[1], 8, 4, 48),
])
def test_strided_view_layout_gradients_without_fallback(monkeypatch, pattern, heads, kv_heads, n):
    """Where every head group sits on whole key/value heads, the strided backend writes
    its output through views only; its backward is checked here without the chunked fallback."""
    def refuse(*args, **kwargs):
        raise AssertionError("fell back to the chunked layout")

    monkeypatch.setattr(strided, "chunked_pattern_attention", refuse)
    spec = resolve_pattern(pattern, chunk_size=6)
    q, k, v, upstream = qkv_and_upstream(2, heads, kv_heads, n, seed=2)
    expected = reference_gradients(q, k, v, upstream, spec, 0.3)
    got = gradients(lambda q, k, v: strided_pattern_attention(q, k, v, spec, 0.3), q, k, v, upstream)
    assert largest_difference(got, expected) <= FLOAT64_TOLERANCE


class _SdpaBackwardLayouts(TorchDispatchMode):
    """Records, for every fused SDPA backward that runs, whether its incoming
    gradient has the strides of the output it belongs to."""

    def __init__(self):
        super().__init__()
        self.matches: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "scaled_dot_product" in name and name.split(".")[1].endswith("_backward"):
            grad_out, out = args[0], args[4]  # every fused backward: (grad_out, q, k, v, out, ...)
            self.matches.append(grad_out.stride() == out.stride())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_sdpa_backward_gets_its_gradient_in_the_output_layout(backend):
    """The gradient reaching each SDPA backward is laid out like its output. Here (batch 1,
    scca_flow's cross(1) group split from its key/value heads, N not a multiple of G) it
    would otherwise be a slice of a transposed longer gradient that counts as contiguous;
    CUDA's fused kernels take that as it is and gave wrong bf16 gradients (see
    test_gpu_bf16_gradients_match_the_reference at N=1030); CPU's kernel reads any
    layout, so the gradients alone cannot show it here."""
    spec = resolve_pattern("scca_flow", chunk_size=5)
    q, k, v, upstream = qkv_and_upstream(1, 4, 2, 11, dtype=torch.float32, seed=4)
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = BACKENDS[backend](q, k, v, spec, 0.3)
    with _SdpaBackwardLayouts() as layouts:
        out.backward(upstream)
    assert layouts.matches, "no fused SDPA backward ran: the check tested nothing"
    assert all(layouts.matches), layouts.matches


def test_sparse_patterns_change_the_gradients():
    """The comparison above is not between look-alikes: each sparse pattern's
    gradients differ from those of full attention."""
    q, k, v, upstream = qkv_and_upstream(1, 8, 4, 40)
    full = reference_gradients(q, k, v, upstream, resolve_pattern("full"), 0.3)
    for name in PRESETS[1:]:
        sparse = reference_gradients(q, k, v, upstream, resolve_pattern(name), 0.3)
        for got, plain in zip(sparse[1:], full[1:]):
            assert (got - plain).abs().max() > 1e-2, name


def test_repeated_backward_through_a_fresh_graph():
    """Nothing cached between calls holds on to an earlier graph: two training steps in a row."""
    spec = resolve_pattern("longmixed", chunk_size=5)
    q, k, v, upstream = qkv_and_upstream(2, 9, 3, 37)
    expected = reference_gradients(q, k, v, upstream, spec, 0.3)
    for backend in ("chunked", "strided", "packed"):
        for _ in range(2):
            got = gradients(lambda q, k, v: BACKENDS[backend](q, k, v, spec, 0.3), q, k, v, upstream)
            assert largest_difference(got, expected) <= FLOAT64_TOLERANCE


def test_flex_refuses_to_train_off_cuda_with_one_line():
    q, k, v, _ = qkv_and_upstream(1, 4, 2, 32, dtype=torch.float32)
    spec = resolve_pattern("s2")
    with pytest.raises(UserError) as error:
        flex_pattern_attention(q.requires_grad_(), k, v, spec, 0.3, block_size=16)
    message = str(error.value)
    assert "\n" not in message and "CUDA" in message and "chunked" in message
    with torch.no_grad():  # evaluation is unaffected
        out = flex_pattern_attention(q, k, v, spec, 0.3, block_size=16)
    expected = masked_attention(q.detach(), k, v, build_mask(spec, 32, 4), 0.3)
    assert (out - expected).abs().max().item() <= 1e-5


# -- GPU (skipped without one) ----------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# The forward's bf16 rule (tests/attention/test_flex.py): relative error ||got - ref|| / ||ref||
# against float64 below BF16_REL_TOL, and within BF16_SDPA_FACTOR times what PyTorch's
# own SDPA loses in bf16 on full causal attention with the same inputs. Here it is
# applied to each gradient, the SDPA yardstick being the worst of its three gradients.
BF16_REL_TOL = 1e-2
BF16_SDPA_FACTOR = 2.0
GPU_PATTERNS = PRESETS + ["sda-r4", "custom"]


def gpu_spec(name: str):
    if name == "sda-r4":
        return resolve_pattern("sda", dilation=4)
    if name == "custom":
        return resolve_pattern("1/4 shifted(100) + 1/4 cross(2) + 1/8 dilated(3,2) + 1/8 dilated(2,1) + 1/4 causal",
                               chunk_size=192)
    return resolve_pattern(name)


def relative_errors(got, expected) -> list[float]:
    return [float((a.double() - b).norm() / b.norm()) for a, b in zip(got, expected)]


def bf16_case(n: int, seed: int):
    """bf16 inputs of LLaMA-2-7B's head layout with 32/8 grouped-query heads, and their
    float64 copies for the references."""
    q, k, v, upstream = qkv_and_upstream(1, 32, 8, n, dim=128, dtype=torch.bfloat16, device="cuda", seed=seed)
    return (q, k, v, upstream), tuple(x.double() for x in (q, k, v, upstream))


def sdpa_gradient_error(bf16, double, scaling) -> float:
    """How far bf16 SDPA's gradients on full causal attention are from float64."""
    causal = resolve_pattern("full")
    expected = reference_gradients(*double, causal, scaling)[1:]
    got = gradients(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scaling, enable_gqa=True), *bf16)[1:]
    return max(relative_errors(got, expected))


GPU_BACKENDS = {
    "chunked": lambda q, k, v, spec, scaling: chunked_pattern_attention(q, k, v, spec, scaling),
    "strided": lambda q, k, v, spec, scaling: strided_pattern_attention(q, k, v, spec, scaling),
    "strided-one-stream": lambda q, k, v, spec, scaling: strided_pattern_attention(q, k, v, spec, scaling,
                                                                                  streams=1),
    "flex": lambda q, k, v, spec, scaling: flex_pattern_attention(q, k, v, spec, scaling),
    "packed": lambda q, k, v, spec, scaling: packed_pattern_attention(q, k, v, spec, scaling),
    "auto": lambda q, k, v, spec, scaling: pattern_attention(q, k, v, spec, scaling),
}


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", list(GPU_BACKENDS))
@pytest.mark.parametrize("n", [2048, 1030])  # 1030 = 4 * 257 + 2: N not a multiple of G
def test_gpu_bf16_gradients_match_the_reference(backend, n):
    bf16, double = bf16_case(n, seed=n)
    scaling = 128 ** -0.5
    sdpa_error = sdpa_gradient_error(bf16, double, scaling)
    for name in GPU_PATTERNS:
        spec = gpu_spec(name)
        expected = reference_gradients(*double, spec, scaling)
        got = gradients(lambda q, k, v: GPU_BACKENDS[backend](q, k, v, spec, scaling), *bf16)
        assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in got), name
        errors = relative_errors(got, expected)
        assert max(errors) < BF16_REL_TOL, (name, errors, sdpa_error)
        assert max(errors) < BF16_SDPA_FACTOR * sdpa_error, (name, errors, sdpa_error)


@gpu
@pytest.mark.gpu
def test_gpu_strided_streams_keep_the_gradients_over_repeated_steps():
    """Backward replays the forward's CUDA streams; several steps in a row, each with
    fresh buffers, must all stay within the bf16 rule (a race would show as garbage).
    Not bitwise: SDPA's own backward may accumulate in a varying order."""
    bf16, double = bf16_case(2048, seed=3)
    spec = resolve_pattern("longmixed")
    expected = reference_gradients(*double, spec, 0.1)
    for _ in range(5):
        got = gradients(lambda q, k, v: strided_pattern_attention(q, k, v, spec, 0.1), *bf16)
        assert max(relative_errors(got, expected)) < BF16_REL_TOL


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["chunked", "strided", "flex", "packed"])
def test_gpu_forward_and_backward_never_wait_on_the_gpu(backend):
    """No host sync in a layer's attention, forward or backward, once its plan is built: a
    sync makes the host wait for the GPU and then the GPU for the host's next launches.
    The SmolLM2 head shape (9 query heads over 3 key/value heads: head groups that split a
    key/value head), every preset."""
    q, k, v, upstream = qkv_and_upstream(1, 9, 3, 2048, dim=64, dtype=torch.bfloat16, device="cuda", seed=5)
    for name in PRESETS:
        spec = resolve_pattern(name)
        run = lambda q, k, v: GPU_BACKENDS[backend](q, k, v, spec, 0.125)  # noqa: E731
        gradients(run, q, k, v, upstream)  # builds and caches the plan, compiles kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            gradients(run, q, k, v, upstream)
        finally:
            torch.cuda.set_sync_debug_mode("default")
