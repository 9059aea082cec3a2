"""RoPE position interpolation: `--rope-scaling linear:F` and the LongLoRA rule.

The reference is transformers' own config path: a checkpoint whose config.json asks
for linear scaling, loaded with plain `from_pretrained`. The inverse frequencies are
also checked against the formula `1 / theta^(2i/d) / F` written out here.
"""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from scca_eval.errors import UserError
from scca_eval.models import load_model, model_record, parse_rope_scaling, trained_length

THETA = 10000.0
HEAD_DIM = 16
TRAINED = 64  # max_position_embeddings of the tiny model
SEQ = 96  # longer than TRAINED, so scaling visibly matters


def _save_tiny_llama(folder, **config_overrides):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TRAINED,
        rope_theta=THETA, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        **config_overrides,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 256)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCCA_EVAL_CACHE", str(tmp_path / "cache"))


def _with_config_edit(src, dst, edit):
    """Copy a checkpoint folder and edit its config.json the way a user's checkpoint would carry it."""
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(3, 256, (1, SEQ), generator=torch.Generator().manual_seed(1))


def _expected_inv_freq(factor):
    exponents = torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM
    return 1.0 / (THETA ** exponents) / factor


def test_parse_rope_scaling_values():
    assert parse_rope_scaling(None).kind == "none"
    assert parse_rope_scaling("none").kind == "none"
    assert parse_rope_scaling("linear:2.5").factor == 2.5
    request = parse_rope_scaling("longlora:8192")
    assert (request.kind, request.finetuned_ctx) == ("longlora", 8192)
    assert parse_rope_scaling("longlora", finetuned_ctx=4096).finetuned_ctx == 4096


@pytest.mark.parametrize(
    "text", ["linear", "linear:0", "linear:-1", "linear:abc", "linear:nan", "longlora", "longlora:0",
             "longlora:12.5", "ntk:2", "yarn"],
)
def test_parse_rope_scaling_rejects_bad_values(text):
    with pytest.raises(UserError) as caught:
        parse_rope_scaling(text)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("factor", [2.0, 3.5])
def test_linear_scaling_matches_transformers_config_path(tiny_folder, tmp_path, factor):
    scaled, _ = load_model(str(tiny_folder), rope_scaling=f"linear:{factor}")
    # transformers 5 format, written into config.json by hand
    reference_folder = _with_config_edit(
        tiny_folder, tmp_path / "rope_parameters",
        lambda c: c.update(rope_parameters={"rope_type": "linear", "factor": factor, "rope_theta": THETA}),
    )
    reference = AutoModelForCausalLM.from_pretrained(reference_folder, dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()

    assert torch.allclose(_logits(scaled, IDS), _logits(reference, IDS), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(scaled, IDS), _logits(plain, IDS), atol=1e-3)
    torch.testing.assert_close(scaled.model.rotary_emb.inv_freq, _expected_inv_freq(factor))
    torch.testing.assert_close(plain.model.rotary_emb.inv_freq, _expected_inv_freq(1.0))


def test_linear_scaling_matches_legacy_rope_scaling_key(tiny_folder, tmp_path):
    """LongLoRA's merged checkpoints carry the transformers-4 key `rope_scaling`."""
    scaled, _ = load_model(str(tiny_folder), rope_scaling="linear:2")
    legacy_folder = _with_config_edit(
        tiny_folder, tmp_path / "legacy",
        lambda c: (c.pop("rope_parameters", None), c.update(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=THETA)),
    )
    legacy = AutoModelForCausalLM.from_pretrained(legacy_folder, dtype=torch.float32).eval()
    assert torch.allclose(_logits(scaled, IDS), _logits(legacy, IDS), atol=1e-5, rtol=1e-5)
    # Loading that checkpoint without the option keeps its own scaling, and says so.
    loaded, tokenizer = load_model(str(legacy_folder))
    assert torch.allclose(_logits(loaded, IDS), _logits(legacy, IDS), atol=1e-5, rtol=1e-5)
    record = model_record(loaded, tokenizer)
    assert record["rope_scaling"]["factor"] == 2.0 and record["rope_scaling"]["source"] == "config"
    assert record["effective_max_length"] == 2 * TRAINED


@pytest.mark.parametrize(
    "finetuned, original_ctx, factor",
    [(100, None, 2.0), (129, None, 3.0), (TRAINED * 4, None, 4.0), (100, 32, 4.0)],
)
def test_longlora_rule(tiny_folder, finetuned, original_ctx, factor):
    """F = ceil(fine-tuned length / original length), the original from the config or given."""
    model, tokenizer = load_model(str(tiny_folder), rope_scaling=f"longlora:{finetuned}", original_ctx=original_ctx)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, _expected_inv_freq(factor))
    record = model_record(model, tokenizer)
    assert record["rope_scaling"]["factor"] == factor
    assert record["rope_scaling"]["rope_type"] == "linear"
    assert record["max_position_embeddings"] == TRAINED
    assert record["effective_max_length"] == int(TRAINED * factor) == trained_length(model)


def test_longlora_within_original_length_does_not_scale(tiny_folder):
    model, tokenizer = load_model(str(tiny_folder), rope_scaling=f"longlora:{TRAINED}")
    plain = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    assert torch.equal(_logits(model, IDS), _logits(plain, IDS))
    record = model_record(model, tokenizer)
    assert record["rope_scaling"]["factor"] == 1.0
    assert trained_length(model) == TRAINED


def test_trained_length_rules(tiny_folder):
    plain, _ = load_model(str(tiny_folder))
    assert trained_length(plain) == TRAINED
    scaled, _ = load_model(str(tiny_folder), rope_scaling="linear:2.5")
    assert trained_length(scaled) == 160
    # Configs that state the extended length themselves (llama3/yarn style) are taken as they are.
    config = LlamaConfig(max_position_embeddings=32768, rope_parameters={
        "rope_type": "yarn", "factor": 8.0, "rope_theta": THETA, "original_max_position_embeddings": 4096})
    assert trained_length(config) == 32768


def test_longlora_without_length_is_refused(tiny_folder):
    with pytest.raises(UserError, match="longlora:CTX"):
        load_model(str(tiny_folder), rope_scaling="longlora")


# ---- dynamic NTK, YaRN and Llama 3: each against transformers' own config path

ORIGINAL = TRAINED  # the original length L the scalings start from, unless --original-ctx says otherwise


def _reference_folder(tiny_folder, tmp_path, rope_parameters, max_position_embeddings):
    """A copy of the checkpoint whose config.json carries the scaling itself, as a released model would."""
    return _with_config_edit(
        tiny_folder, tmp_path / "reference",
        lambda c: c.update(rope_parameters={"rope_theta": THETA, **rope_parameters},
                           max_position_embeddings=max_position_embeddings),
    )


SCALINGS = [
    # (option, original_ctx, rope_parameters written into config.json by hand, its max_position_embeddings)
    ("dynamic:2", None, {"rope_type": "dynamic", "factor": 2.0}, TRAINED),
    ("dynamic:3.5", None, {"rope_type": "dynamic", "factor": 3.5}, TRAINED),
    ("yarn:4", None, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
     4 * ORIGINAL),
    ("yarn:4,beta_fast=16,beta_slow=2,attention_factor=1.25", None,
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 16.0,
      "beta_slow": 2.0, "attention_factor": 1.25}, 4 * ORIGINAL),
    ("yarn:3", 32, {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 32}, 96),
    ("yarn:2,mscale=1,mscale_all_dim=0.5,truncate=false", None,
     {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": ORIGINAL, "mscale": 1.0,
      "mscale_all_dim": 0.5, "truncate": False}, 2 * ORIGINAL),
    ("llama3:4", None, {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 4 * ORIGINAL),
    ("llama3:8,low_freq_factor=2,high_freq_factor=8", 16,
     {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16, "low_freq_factor": 2.0,
      "high_freq_factor": 8.0}, 128),
]


@pytest.mark.parametrize("option, original_ctx, rope_parameters, max_positions", SCALINGS,
                         ids=[s[0] + (f"/L={s[1]}" if s[1] else "") for s in SCALINGS])
def test_scaling_matches_transformers_config_path(tiny_folder, tmp_path, option, original_ctx, rope_parameters,
                                                  max_positions):
    scaled, tokenizer = load_model(str(tiny_folder), rope_scaling=option, original_ctx=original_ctx)
    reference_folder = _reference_folder(tiny_folder, tmp_path, rope_parameters, max_positions)
    reference = AutoModelForCausalLM.from_pretrained(reference_folder, dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()

    logits = _logits(scaled, IDS)
    assert torch.equal(logits, _logits(reference, IDS))  # same parameters, same computation
    assert not torch.allclose(logits, _logits(plain, IDS), atol=1e-3)  # and the scaling does something
    # inv_freq after the forward pass: dynamic NTK recomputes it for the pass's length.
    assert torch.equal(scaled.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    assert not torch.equal(scaled.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)
    assert scaled.model.rotary_emb.attention_scaling == reference.model.rotary_emb.attention_scaling

    record = model_record(scaled, tokenizer)["rope_scaling"]
    assert record["source"] == "option" and record["requested"] == option
    # the complete RoPE configuration the model was built with
    assert {k: v for k, v in record.items() if k not in ("source", "requested", "original_ctx")} == {
        "rope_theta": THETA, **rope_parameters}
    factor = rope_parameters["factor"]
    expected_length = int(factor * (original_ctx or ORIGINAL))
    assert trained_length(scaled) == expected_length == model_record(scaled, tokenizer)["effective_max_length"]


def test_yarn_matches_its_formula(tiny_folder):
    """An independent check of one case: YaRN's ramp between interpolation and extrapolation
    (Peng et al. 2023, eq. 17-20), written out here, and its attention factor 0.1 ln F + 1."""
    import math

    factor, beta_fast, beta_slow = 4.0, 32.0, 1.0
    model, _ = load_model(str(tiny_folder), rope_scaling=f"yarn:{factor:g}")
    dims = torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM
    extrapolated = 1.0 / THETA ** dims

    def dim_of(rotations):  # the dimension that turns `rotations` times over the original length
        return HEAD_DIM * math.log(ORIGINAL / (rotations * 2 * math.pi)) / (2 * math.log(THETA))

    low, high = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), HEAD_DIM - 1)
    ramp = ((torch.arange(HEAD_DIM // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    expected = extrapolated / factor * ramp + extrapolated * (1 - ramp)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, expected)
    assert model.model.rotary_emb.attention_scaling == pytest.approx(0.1 * math.log(factor) + 1)


def test_dynamic_frequencies_follow_each_forward_pass(tiny_folder, tmp_path):
    """A window's logits do not depend on a longer window run before it (transformers alone
    would keep the longer window's frequencies)."""
    model, _ = load_model(str(tiny_folder), rope_scaling="dynamic:2")
    reference_folder = _reference_folder(tiny_folder, tmp_path, {"rope_type": "dynamic", "factor": 2.0}, TRAINED)
    fresh = AutoModelForCausalLM.from_pretrained(reference_folder, dtype=torch.float32).eval()
    short = IDS[:, :80]  # beyond the 64 trained positions, shorter than the window before it
    _logits(model, IDS)
    assert torch.equal(_logits(model, short), _logits(fresh, short))
    _logits(model, IDS)
    assert torch.equal(_logits(model, IDS[:, :40]), _logits(fresh, IDS[:, :40]))  # within the trained length
    # the difference the hook removes is real: transformers' own model, reused, gives other numbers
    reused = AutoModelForCausalLM.from_pretrained(reference_folder, dtype=torch.float32).eval()
    _logits(reused, IDS)
    assert not torch.equal(_logits(reused, short), _logits(fresh, short))


def test_checkpoint_scaling_used_as_is_unless_overridden(tiny_folder, tmp_path):
    shipped = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": TRAINED}
    folder = _reference_folder(tiny_folder, tmp_path, shipped, 2 * TRAINED)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    as_is, tokenizer = load_model(str(folder))
    assert torch.equal(_logits(as_is, IDS), _logits(reference, IDS))
    record = model_record(as_is, tokenizer)
    assert record["rope_scaling"] == {"rope_theta": THETA, **shipped, "source": "config"}
    assert record["effective_max_length"] == 2 * TRAINED

    overridden, tokenizer = load_model(str(folder), rope_scaling="linear:3")
    record = model_record(overridden, tokenizer)["rope_scaling"]
    assert record["source"] == "option" and record["rope_type"] == "linear" and record["factor"] == 3.0
    assert record["replaced"] == {"rope_theta": THETA, **shipped}
    linear = AutoModelForCausalLM.from_pretrained(_with_config_edit(
        tiny_folder, tmp_path / "linear3",
        lambda c: c.update(rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": THETA})),
        dtype=torch.float32).eval()
    assert torch.equal(_logits(overridden, IDS), _logits(linear, IDS))


def test_parse_new_scalings():
    request = parse_rope_scaling("yarn:4,beta_fast=64, truncate=False")
    assert (request.kind, request.factor) == ("yarn", 4.0)
    assert dict(request.options) == {"beta_fast": 64.0, "truncate": False}
    assert parse_rope_scaling("DYNAMIC:2").kind == "dynamic"
    assert dict(parse_rope_scaling("llama3:8,high_freq_factor=4").options) == {"high_freq_factor": 4.0}


@pytest.mark.parametrize("text, fragment", [
    ("yarn", "needs a factor"), ("yarn:0.5", "at least 1"), ("dynamic:0", "above 0"), ("llama3:x", "not a number"),
    ("yarn:4,beta=3", "not an option of yarn"), ("yarn:4,beta_fast", "not an option"),
    ("yarn:4,beta_fast=fast", "must be a number"), ("yarn:4,truncate=maybe", "true or false"),
    ("yarn:4,beta_fast=1,beta_fast=2", "twice"), ("dynamic:2,beta_fast=1", "takes no options"),
    ("llama3:8,beta_fast=32", "not an option of llama3"), ("longlora:8192,x=1", "takes no options"),
    ("linear:2,factor=3", "takes no options"), ("yarn:inf", "finite"),
])
def test_parse_new_scalings_rejects(text, fragment):
    with pytest.raises(UserError, match=fragment) as caught:
        parse_rope_scaling(text)
    assert "\n" not in str(caught.value)


def test_dynamic_refuses_original_ctx(tiny_folder):
    with pytest.raises(UserError, match="--original-ctx does not apply"):
        load_model(str(tiny_folder), rope_scaling="dynamic:2", original_ctx=32)


def test_trained_length_of_released_configs():
    # Llama 3.1: 8k original, factor 8, 128k stated; Qwen2.5's YaRN recipe: factor 4 over an unchanged 32k.
    llama31 = LlamaConfig(max_position_embeddings=131072, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0, "original_max_position_embeddings": 8192,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    assert trained_length(llama31) == 131072
    qwen = LlamaConfig(max_position_embeddings=32768, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6, "original_max_position_embeddings": 32768})
    assert trained_length(qwen) == 131072
    dynamic = LlamaConfig(max_position_embeddings=4096, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": THETA})
    assert trained_length(dynamic) == 8192


def test_ctx_beyond_rope_is_refused_or_warned_once(tiny_folder, tmp_path):
    """Beyond what the RoPE settings cover: an error naming --rope-scaling, or with
    --allow-long-context one warning per model (not one per pattern)."""
    from scca_eval import evaluate

    text = tmp_path / "doc.txt"
    text.write_text(" ".join(f"w{3 + i % 250}" for i in range(400)))
    loaded = load_model(str(tiny_folder))
    with pytest.raises(UserError, match=r"ctx 96 is beyond the 64 tokens .* --rope-scaling yarn:2 .*"
                                        r"--allow-long-context"):
        evaluate(str(tiny_folder), data=[str(text)], ctx=96, loaded=loaded)
    said = []
    for pattern in ("full", "s2"):
        evaluate(str(tiny_folder), data=[str(text)], ctx=96, pattern=pattern, loaded=loaded,
                 allow_long_context=True, notify=said.append)
    assert len([line for line in said if "--rope-scaling" in line]) == 1
    # once scaled far enough, no warning at all
    scaled = load_model(str(tiny_folder), rope_scaling="yarn:2")
    said.clear()
    evaluate(str(tiny_folder), data=[str(text)], ctx=96, loaded=scaled, notify=said.append)
    assert not [line for line in said if "--rope-scaling" in line]
