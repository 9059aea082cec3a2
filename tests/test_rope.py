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
