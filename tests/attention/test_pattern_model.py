"""Patterns inside a whole transformers model: registration really applies the
pattern, nothing leaks from later tokens, and unsuitable models are refused."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import VOCAB, logits, tiny_llama, token_batch

from scca_eval.attention import apply_pattern, call_counts, masked_attention, pattern_of, reset_call_counts
from scca_eval.errors import UserError
from scca_eval.patterns import PRESET_DESCRIPTIONS, build_mask, resolve_pattern

PRESETS = list(PRESET_DESCRIPTIONS)
SPARSE = [name for name in PRESETS if name != "full"]


@pytest.fixture(scope="module")
def base_model():
    return tiny_llama()


@pytest.fixture(scope="module")
def smollm_shaped():
    # SmolLM2-135M's attention layout: 9 query heads sharing 3 key/value heads
    return tiny_llama(heads=9, kv_heads=3, head_dim=8, seed=1)


def with_pattern(model, spec, backend="auto"):
    patterned = copy.deepcopy(model)
    apply_pattern(patterned, spec, backend=backend)
    return patterned


# A second, independent attention implementation for the tests: the dense mask
# of the spec and plain softmax, registered under its own name; the spec rides on
# the reference model's config as a plain object.
def _dense_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    spec = module.config.dense_reference_spec
    mask = build_mask(spec, query.shape[2], query.shape[1])
    return masked_attention(query, key, value, mask, scaling).transpose(1, 2).contiguous(), None


def with_dense_reference(model, spec):
    from transformers import AttentionInterface

    AttentionInterface.register("dense_reference_for_tests", _dense_attention)
    reference = copy.deepcopy(model)
    reference.config.dense_reference_spec = spec
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


def test_model_switched_to_scca_without_a_pattern_says_what_to_do(base_model):
    from scca_eval.attention.register import register

    register()
    model = copy.deepcopy(base_model)
    model.set_attn_implementation("scca")  # by hand, without apply_pattern
    with pytest.raises(UserError, match="apply_pattern"):
        logits(model, token_batch())


# -- the pattern travels with the model ----------------------------------------------------
CARRIED = ["longmixed", "1/4 local + 1/4 shifted(3) + 1/2 dilated(3,1)"]


@pytest.mark.parametrize("pattern", CARRIED)
def test_copied_model_keeps_its_pattern(base_model, pattern):
    spec = resolve_pattern(pattern, chunk_size=5)
    model = copy.deepcopy(with_pattern(base_model, spec, backend="reference"))
    assert pattern_of(model) == spec
    ids = token_batch()
    assert torch.allclose(logits(model, ids), logits(with_dense_reference(base_model, spec), ids), atol=1e-4)


@pytest.mark.parametrize("pattern", CARRIED)
def test_saved_model_keeps_its_pattern(base_model, tmp_path, pattern):
    from transformers import LlamaForCausalLM

    from scca_eval.attention.register import register

    spec = resolve_pattern(pattern, chunk_size=5)
    with_pattern(base_model, spec).save_pretrained(tmp_path)
    register()
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="scca").eval()
    assert pattern_of(reloaded) == spec
    ids = token_batch()
    assert torch.allclose(logits(reloaded, ids), logits(with_dense_reference(base_model, spec), ids), atol=1e-4)


def test_peft_wrapped_model_keeps_its_pattern(base_model):
    from peft import LoraConfig, get_peft_model

    spec = resolve_pattern("scca_fixed", chunk_size=6)
    wrapped = get_peft_model(with_pattern(base_model, spec),
                             LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    assert pattern_of(wrapped) == spec
    ids = token_batch()
    # a new LoRA adapter starts at zero, so the wrapped model computes what the base model does
    assert torch.allclose(logits(wrapped, ids), logits(with_dense_reference(base_model, spec), ids), atol=1e-4)


def test_applying_the_same_pattern_again_changes_nothing(base_model, monkeypatch):
    from scca_eval.attention import register

    model = with_pattern(base_model, resolve_pattern("s2"))
    checks = []
    monkeypatch.setattr(register, "check_architecture", checks.append)
    apply_pattern(model, resolve_pattern("s2"))
    assert checks == []
    apply_pattern(model, resolve_pattern("s2"), backend="reference")  # another kernel: applied
    apply_pattern(model, resolve_pattern("scca_fixed"), backend="reference")  # another pattern: applied
    assert len(checks) == 2 and pattern_of(model) == resolve_pattern("scca_fixed")


@pytest.mark.parametrize("pattern", ["s2", "longmixed"])
def test_training_mode_gradients_equal_the_dense_reference(base_model, pattern):
    spec = resolve_pattern(pattern, chunk_size=5)
    ids = token_batch(batch=2, n=23)
    grads = []
    for model in (with_pattern(base_model, spec), with_dense_reference(base_model, spec)):
        model.train()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


def test_applying_the_same_pattern_on_another_backend_switches_the_kernel(base_model):
    """One settings object serves every model under a pattern, so a layer must notice a
    changed backend by itself and not only a changed pattern."""
    model = copy.deepcopy(base_model)
    spec = resolve_pattern("s2", chunk_size=4)
    ids = token_batch(1, 16)
    for backend in ("chunked", "strided", "chunked"):
        apply_pattern(model, spec, backend=backend)
        reset_call_counts()
        with torch.no_grad():
            model(ids)
        assert set(call_counts()) == {backend}
