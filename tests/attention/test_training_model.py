"""Training a whole model under a pattern (model.train(), through apply_pattern):
gradients equal those of a dense-mask model, nothing leaks from later tokens into the
loss or its gradients, gradient checkpointing changes nothing, and attention dropout
is refused with one line. Tiny random LLaMAs in float64 on CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import one_thread  # noqa: F401  (a fixture)

from scca_eval.attention import apply_pattern, call_counts, reset_call_counts
from scca_eval.errors import UserError
from scca_eval.patterns import PRESET_DESCRIPTIONS, resolve_pattern
from test_pattern_model import VOCAB, tiny_llama, token_batch, with_dense_reference

PRESETS = list(PRESET_DESCRIPTIONS)
MIX = "1/4 local + 1/4 shifted(3) + 1/2 dilated(3,1)"
# float64: the same computation in another order agrees to ~1e-15
TOLERANCE = 1e-12


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def models():
    # LLaMA-like 4/2 heads, and SmolLM2's 9 query heads on 3 key/value heads
    return {"llama": tiny_llama().double(), "smollm": tiny_llama(heads=9, kv_heads=3, head_dim=8, seed=1).double()}


def training_copy(model, pattern: str, backend: str = "auto", chunk_size=None, checkpointing=False):
    trained = copy.deepcopy(model)
    apply_pattern(trained, resolve_pattern(pattern, chunk_size=chunk_size), backend=backend)
    if checkpointing:
        # newer transformers 5 releases rename gradient_checkpointing_enable (the old name warns)
        if hasattr(trained, "activation_checkpointing_enable"):
            trained.activation_checkpointing_enable()
            assert trained.is_activation_checkpointing
        else:
            trained.gradient_checkpointing_enable()
            assert trained.is_gradient_checkpointing
    return trained.train()


def loss_and_gradients(model, ids, labels, upto: int | None = None):
    """Next-token loss of the predictions at positions 0..upto-1 (the labels up to
    ``upto``), and its gradients w.r.t. every parameter and the input embeddings."""
    model.zero_grad(set_to_none=True)
    embeddings = model.get_input_embeddings()(ids)
    embeddings.retain_grad()
    logits = model(inputs_embeds=embeddings, use_cache=False).logits
    upto = ids.shape[1] - 1 if upto is None else upto
    loss = torch.nn.functional.cross_entropy(logits[:, :upto].flatten(0, 1), labels[:, 1:upto + 1].flatten())
    loss.backward()
    parameters = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), embeddings.grad, parameters


def largest_parameter_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[name] - b[name]).abs().max().item() for name in a)


# -- gradients of the whole model ----------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "strided", "packed"])
@pytest.mark.parametrize("pattern", PRESETS[1:] + [MIX])
@pytest.mark.parametrize("model_name", ["llama", "smollm"])
def test_training_gradients_equal_a_dense_mask_model(models, backend, pattern, model_name):
    model = models[model_name]
    chunk_size = None if pattern in PRESETS else 5
    spec = resolve_pattern(pattern, chunk_size=chunk_size)
    ids = token_batch(batch=2, n=37)
    reset_call_counts()
    got = loss_and_gradients(training_copy(model, pattern, backend, chunk_size), ids, ids)
    assert call_counts() == {"chunked" if backend == "auto" else backend: model.config.num_hidden_layers}
    reset_call_counts()
    expected = loss_and_gradients(with_dense_reference(model, spec).train(), ids, ids)
    assert abs(got[0] - expected[0]) <= TOLERANCE
    assert (got[1] - expected[1]).abs().max() <= TOLERANCE
    assert largest_parameter_difference(got[2], expected[2]) <= TOLERANCE
    # every parameter trains (q, k, v and o projections included)
    assert len(got[2]) == len(list(model.parameters()))


# -- no leak from later tokens, in training mode ---------------------------------------
def later_tokens_changed(ids: torch.Tensor, t: int, seed: int) -> torch.Tensor:
    changed = ids.clone()
    changed[:, t + 1:] = torch.randint(0, VOCAB, changed[:, t + 1:].shape, generator=torch.Generator().manual_seed(seed))
    assert not torch.equal(changed, ids)
    return changed


def leak(model, ids: torch.Tensor, t: int) -> float:
    """How much the loss at positions <= t and its gradients move when every token after
    t changes (0 for a causal model). The labels stay the original tokens in both runs."""
    before = loss_and_gradients(model, ids, ids, upto=t)
    after = loss_and_gradients(model, later_tokens_changed(ids, t, seed=t), ids, upto=t)
    return max(abs(before[0] - after[0]).item(),
               (before[1] - after[1]).abs().max().item(),  # embeddings, at every position
               after[1][:, t + 1:].abs().max().item(),  # nothing flows to the changed tokens
               largest_parameter_difference(before[2], after[2]))


@pytest.mark.parametrize("backend", ["auto", "strided", "packed"])
@pytest.mark.parametrize("pattern,chunk_size", [(name, None) for name in PRESETS] + [("scca_flow", 4), (MIX, 5)])
def test_loss_and_gradients_before_t_ignore_later_tokens(models, backend, pattern, chunk_size):
    model = training_copy(models["smollm"], pattern, backend, chunk_size)
    ids = token_batch(batch=2, n=37)
    for t in (3, 9, 25):  # in the first chunk, the first token of a chunk (G = 9), a late chunk
        assert leak(model, ids, t) <= TOLERANCE, (pattern, t)
    # the later tokens do matter to the loss over the whole window
    whole, changed = (loss_and_gradients(model, x, ids)[0] for x in (ids, later_tokens_changed(ids, 18, seed=18)))
    assert abs(whole - changed) > 1e-3


def _bidirectional_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from scca_eval.attention.reference import expand_kv_heads

    heads = query.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, expand_kv_heads(key, heads), expand_kv_heads(value, heads), scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def test_the_leak_check_catches_a_leak(models):
    """A model that looks at later tokens (bidirectional attention) fails the check above."""
    from transformers import AttentionInterface

    AttentionInterface.register("bidirectional_for_tests", _bidirectional_attention)
    model = copy.deepcopy(models["smollm"])
    model.set_attn_implementation("bidirectional_for_tests")
    assert leak(model.train(), token_batch(batch=2, n=37), 18) > 1e-3


# -- gradient checkpointing ----------------------------------------------------------------
@pytest.mark.parametrize("backend", ["auto", "strided", "packed"])
@pytest.mark.parametrize("pattern", ["s2", "longmixed", MIX])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(models, backend, pattern):
    model = models["llama"]
    chunk_size = None if pattern in PRESETS else 5
    ids = token_batch(batch=2, n=37)
    plain = loss_and_gradients(training_copy(model, pattern, backend, chunk_size), ids, ids)
    reset_call_counts()
    checkpointed = loss_and_gradients(training_copy(model, pattern, backend, chunk_size, checkpointing=True),
                                      ids, ids)
    # the backward pass recomputed every layer's attention under the pattern
    layers = model.config.num_hidden_layers
    assert call_counts() == {"chunked" if backend == "auto" else backend: 2 * layers}
    reset_call_counts()
    assert abs(plain[0] - checkpointed[0]) <= TOLERANCE
    assert (plain[1] - checkpointed[1]).abs().max() <= TOLERANCE
    assert largest_parameter_difference(plain[2], checkpointed[2]) <= TOLERANCE


# -- attention dropout ---------------------------------------------------------------------
def test_attention_dropout_is_refused_in_training_with_one_line():
    from transformers import LlamaForCausalLM

    config = tiny_llama().config
    config.attention_dropout = 0.1
    model = LlamaForCausalLM(config)
    apply_pattern(model, resolve_pattern("s2"))
    ids = token_batch(batch=1, n=16)
    with pytest.raises(UserError) as error:
        model.train()(input_ids=ids, labels=ids, use_cache=False)
    message = str(error.value)
    assert "\n" not in message and "attention_dropout=0.1" in message and "attention_dropout=0 to train" in message
    with torch.no_grad():  # evaluation ignores the configured dropout, as transformers does
        assert torch.isfinite(model.eval()(input_ids=ids, use_cache=False).logits).all()


def test_training_steps_lower_the_loss_under_a_pattern(models):
    """A few plain SGD steps in training mode go through the pattern and learn."""
    model = training_copy(models["llama"], "longmixed")
    ids = token_batch(batch=2, n=37)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_under_autocast_the_kernels_get_one_dtype(monkeypatch):
    """Qwen3's float32 q_norm hands over float32 queries and keys beside autocast's bfloat16
    values; the pattern's kernels get all three in autocast's dtype, as SDPA gets them from
    autocast itself (the packed kernel takes no mixed dtypes, FlexAttention's backward neither)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from scca_eval.attention import register

    seen = []
    run = register.pattern_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return run(q, k, v, *args, **kwargs)

    monkeypatch.setattr(register, "pattern_attention", spy)
    config = AutoConfig.for_model("qwen3", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = AutoModelForCausalLM.from_config(config)  # float32 weights: q_norm's output is float32
    apply_pattern(model, resolve_pattern("s2"))
    ids = token_batch(batch=1, n=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert seen == [(torch.bfloat16,) * 3]
    seen.clear()
    model(input_ids=ids, use_cache=False)  # without autocast: the model's own dtype, untouched
    assert seen == [(torch.float32,) * 3]
