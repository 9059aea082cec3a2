"""Patterns inside a whole transformers model: registration really applies the
pattern, nothing leaks from later tokens, and unsuitable models are refused."""

from __future__ import annotations

import copy

import pytest
import torch

from scca_eval.attention import apply_pattern, call_counts, masked_attention, pattern_of, reset_call_counts
from scca_eval.errors import UserError
from scca_eval.patterns import PRESET_DESCRIPTIONS, build_mask, resolve_pattern

PRESETS = list(PRESET_DESCRIPTIONS)
SPARSE = [name for name in PRESETS if name != "full"]
VOCAB = 256


def tiny_llama(heads=4, kv_heads=2, head_dim=16, layers=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=heads * head_dim, intermediate_size=96,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=256,
                         # larger random weights than the default 0.02 give sharper
                         # attention, so that a pattern visibly changes the outputs
                         initializer_range=0.1)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def base_model():
    return tiny_llama()


@pytest.fixture(scope="module")
def smollm_shaped():
    # SmolLM2-135M's attention layout: 9 query heads sharing 3 key/value heads
    return tiny_llama(heads=9, kv_heads=3, head_dim=8, seed=1)


def token_batch(batch=2, n=37, seed=0):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kwargs).logits


def with_pattern(model, spec, backend="auto"):
    patterned = copy.deepcopy(model)
    apply_pattern(patterned, spec, backend=backend)
    return patterned


# A second, independent attention implementation for the tests: the dense mask
# of the spec and plain softmax, registered under its own name.
_DENSE_SPECS: dict[int, object] = {}


def _dense_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    spec = _DENSE_SPECS[id(module.config)]
    mask = build_mask(spec, query.shape[2], query.shape[1])
    return masked_attention(query, key, value, mask, scaling).transpose(1, 2).contiguous(), None


def with_dense_reference(model, spec):
    from transformers import AttentionInterface

    AttentionInterface.register("dense_reference_for_tests", _dense_attention)
    reference = copy.deepcopy(model)
    _DENSE_SPECS[id(reference.config)] = spec
    reference.set_attn_implementation("dense_reference_for_tests")
    return reference


# -- registration really applies the pattern ------------------------------------------
@pytest.mark.parametrize("pattern", SPARSE + ["1/4 local + 1/4 shifted(3) + 1/2 dilated(3,1)"])
@pytest.mark.parametrize("model_name", ["base_model", "smollm_shaped"])
def test_model_output_equals_dense_reference(request, pattern, model_name):
    model = request.getfixturevalue(model_name)
    spec = resolve_pattern(pattern, chunk_size=None if pattern in SPARSE else 5)
    ids = token_batch()
    patterned = with_pattern(model, spec)
    assert patterned.config._attn_implementation == "scca" and pattern_of(patterned) == spec
    expected = logits(with_dense_reference(model, spec), ids)
    assert torch.allclose(logits(patterned, ids), expected, atol=1e-4)
    assert (expected - logits(model, ids)).abs().max() > 1e-3  # and the pattern matters


def test_pattern_calls_are_counted(base_model):
    reset_call_counts()
    logits(with_pattern(base_model, resolve_pattern("s2")), token_batch())
    assert call_counts() == {"chunked": base_model.config.num_hidden_layers}


def test_two_models_with_different_patterns_in_one_process(base_model):
    ids = token_batch()
    s2_spec, fixed_spec = resolve_pattern("s2"), resolve_pattern("scca_fixed", chunk_size=6)
    s2_model = with_pattern(base_model, s2_spec)
    fixed_model = with_pattern(base_model, fixed_spec, backend="reference")
    assert pattern_of(s2_model) == s2_spec and pattern_of(fixed_model) == fixed_spec
    assert torch.allclose(logits(s2_model, ids), logits(with_dense_reference(base_model, s2_spec), ids), atol=1e-4)
    assert torch.allclose(logits(fixed_model, ids), logits(with_dense_reference(base_model, fixed_spec), ids),
                          atol=1e-4)
    assert pattern_of(base_model) is None


def test_full_keeps_sdpa_and_undoes_a_pattern(base_model):
    ids = token_batch()
    plain = logits(base_model, ids)
    model = copy.deepcopy(base_model)
    apply_pattern(model, resolve_pattern("full"))
    assert model.config._attn_implementation == "sdpa" and pattern_of(model) is None
    assert torch.equal(logits(model, ids), plain)
    apply_pattern(model, resolve_pattern("s2"))
    assert not torch.allclose(logits(model, ids), plain, atol=1e-3)
    apply_pattern(model, resolve_pattern("full"))
    assert model.config._attn_implementation == "sdpa" and pattern_of(model) is None
    assert torch.allclose(logits(model, ids), plain, atol=1e-6)


def test_s2_changes_the_loss(base_model):
    ids = token_batch(batch=1, n=64)
    with torch.no_grad():
        full_loss = base_model(input_ids=ids, labels=ids, use_cache=False).loss.item()
        s2_loss = with_pattern(base_model, resolve_pattern("s2"))(input_ids=ids, labels=ids, use_cache=False).loss.item()
    assert abs(full_loss - s2_loss) > 1e-2  # fp32 noise between two attention paths is ~1e-6


# -- no leakage from later tokens -----------------------------------------------------------
@pytest.mark.parametrize("pattern,chunk_size", [(name, None) for name in PRESETS] + [
    ("scca_flow", 4), ("longmixed", 7), ("sda", 5), ("1/2 shifted(3) + 1/2 cross(2)", 6)])
def test_changing_later_tokens_leaves_earlier_logits(base_model, pattern, chunk_size):
    model = base_model if pattern == "full" else with_pattern(base_model, resolve_pattern(pattern, chunk_size=chunk_size))
    ids = token_batch(batch=2, n=37)
    before = logits(model, ids)
    for t in (0, 4, 9, 18, 30):
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(0, VOCAB, changed[:, t + 1:].shape,
                                           generator=torch.Generator().manual_seed(t))
        after = logits(model, changed)
        assert torch.allclose(after[:, :t + 1], before[:, :t + 1], atol=1e-6, rtol=0), (pattern, t)
        if t < 30:
            assert not torch.allclose(after[:, t + 1:], before[:, t + 1:], atol=1e-3)


# -- refusals -----------------------------------------------------------------------------
def test_padded_batches_are_refused(base_model):
    model = with_pattern(base_model, resolve_pattern("s2"))
    ids = token_batch()
    ones = torch.ones_like(ids)
    assert torch.allclose(logits(model, ids, attention_mask=ones), logits(model, ids), atol=1e-6)
    padded = ones.clone()
    padded[0, :5] = 0
    with pytest.raises(UserError, match="padded"):
        logits(model, ids, attention_mask=padded)


@pytest.mark.filterwarnings("ignore:.past_key_values. is deprecated")
def test_decoding_with_a_cache_is_refused(base_model):
    model = with_pattern(base_model, resolve_pattern("s2"))
    ids = token_batch(batch=1, n=12)
    with torch.no_grad():
        first = model(input_ids=ids[:, :11], use_cache=True)
        cache = getattr(first, "past_key_values", None) or getattr(first, "cache", None)
        with pytest.raises(UserError, match="whole windows"):
            model(input_ids=ids[:, 11:], past_key_values=cache, use_cache=True)


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_encoder_model_is_refused():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UserError) as error:
        apply_pattern(model, resolve_pattern("s2"))
    assert "BertForMaskedLM" in _one_line(error)
    assert model.config._attn_implementation != "scca"


def test_model_without_attention_interface_is_refused():
    from transformers import LlamaForCausalLM

    class LegacyLlamaForCausalLM(LlamaForCausalLM):
        _supports_attention_backend = False

    model = LegacyLlamaForCausalLM(tiny_llama().config)
    with pytest.raises(UserError) as error:
        apply_pattern(model, resolve_pattern("scca_fixed"))
    assert "LegacyLlamaForCausalLM" in _one_line(error) and "AttentionInterface" in str(error.value)


def test_sliding_window_model_is_refused():
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=16))
    with pytest.raises(UserError) as error:
        apply_pattern(model, resolve_pattern("s2"))
    assert "MistralForCausalLM" in _one_line(error) and "sliding-window" in str(error.value)


def test_unknown_backend_is_refused(base_model):
    with pytest.raises(UserError, match="unknown attention backend"):
        apply_pattern(copy.deepcopy(base_model), resolve_pattern("s2"), backend="fastest")


def test_copied_model_without_pattern_says_what_to_do(base_model):
    model = copy.deepcopy(with_pattern(base_model, resolve_pattern("s2")))  # the copy's config is new
    with pytest.raises(UserError, match="apply_pattern"):
        logits(model, token_batch())
